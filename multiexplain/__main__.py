"""``python -m multiexplain ...`` (and ``torchrun ... -m multiexplain explain-dataset ...``): the command line."""

import sys

from .cli import main

sys.exit(main())
