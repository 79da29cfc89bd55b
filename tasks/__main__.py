"""`python -m tasks`: see tasks/cli.py."""

import sys

from tasks.cli import main

sys.exit(main())
