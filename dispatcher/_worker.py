"""Entry point of a ``--processes`` worker: ``python -m dispatcher._worker``."""

from dispatcher.multiproc import worker_main

raise SystemExit(worker_main())
