"""``python -m prebake.convert ...`` is the ``prebake`` command."""

import sys

from prebake.convert.cli import main

sys.exit(main())
