from livemig.cli.main import main

raise SystemExit(main())
