"""``python -m fedsync.cli``: the same entry point as the ``fedsync`` script."""

import sys

from fedsync.cli import main

sys.exit(main())
