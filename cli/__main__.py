"""``python -m fieldscope.cli`` runs the same command line as ``fieldscope``."""

import sys

from fieldscope.cli.main import main

sys.exit(main())
