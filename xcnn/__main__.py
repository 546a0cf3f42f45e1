"""``python -m xcnn``: the same as the ``xcnn`` command."""

from .cli import main

raise SystemExit(main())
