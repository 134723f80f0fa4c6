"""``python -m fastmerge``: the same as the ``fastmerge`` command."""

from fastmerge.cli import main

raise SystemExit(main())
