"""``python -m unetrpp``: the same as the ``unetrpp`` command."""

from .cli.main import main

raise SystemExit(main())
