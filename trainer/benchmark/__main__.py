"""`python -m trainer.benchmark` (and `accelerate launch -m trainer.benchmark`)."""

import sys

from trainer.benchmark.run import main

sys.exit(main())
