from ctxcache.cli import main

raise SystemExit(main())
