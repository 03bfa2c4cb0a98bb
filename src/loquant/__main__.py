"""`python -m loquant ...` (and `torchrun ... -m loquant ...`): the command line."""

import sys

from loquant.cli import main

sys.exit(main())
