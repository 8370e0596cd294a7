"""Entry point of a ``--processes`` worker: ``python -m dispatcher.run.worker``."""

from dispatcher.run.multiproc import worker_main

raise SystemExit(worker_main())
