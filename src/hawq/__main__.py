"""`python -m hawq ...`: the same command line as `hawq ...`."""

from hawq.cli import main

raise SystemExit(main())
