"""`python -m trainer.benchmark` (and `./launch.sh -m trainer.benchmark`)."""

import sys

from trainer.console import record_exit_code
from trainer.benchmark.run import main

sys.exit(record_exit_code(main()))
