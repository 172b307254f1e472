from neuronaudit.cli import main

raise SystemExit(main())
