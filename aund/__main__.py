from aund.cli import main

raise SystemExit(main())
