"""``python -m harness.trace``: see ``harness.trace.cli``."""
import sys

from harness.trace.cli import main

sys.exit(main())
