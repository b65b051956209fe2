"""`python -m trainer.evaluate` (and `./launch.sh -m trainer.evaluate`)."""

import sys

from trainer.console import record_exit_code
from trainer.evaluate.cli import main

sys.exit(record_exit_code(main()))
