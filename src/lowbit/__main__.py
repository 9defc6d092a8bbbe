"""``python -m lowbit``: the ``lowbit`` command."""

from .cli import main

raise SystemExit(main())
