"""``python -m services.cli``: the ``drpo`` command without the installed console script."""

import sys

from services.cli.main import main

sys.exit(main())
