from dispatcher.commands.cli import main

raise SystemExit(main())
