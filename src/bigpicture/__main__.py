"""``python -m bigpicture``: the command line (see bigpicture.cli)."""

from bigpicture.cli import main

raise SystemExit(main())
