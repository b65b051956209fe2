"""`python -m trainer.evaluate` (and `accelerate launch -m trainer.evaluate`)."""

import sys

from trainer.evaluate.evaluation import main

sys.exit(main())
