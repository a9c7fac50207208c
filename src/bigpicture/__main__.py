"""``python -m bigpicture``: the command line (see bigpicture.cli)."""

from .cli import main

raise SystemExit(main())
