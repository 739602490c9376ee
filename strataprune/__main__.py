from strataprune.cli import main

raise SystemExit(main())
