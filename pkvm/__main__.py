"""``python -m pkvm``: the ``pkvm`` command line (see :mod:`pkvm.cli`)."""

from pkvm.cli import main

raise SystemExit(main())
