"""``python -m asyncckpt.cli``, the same as ``python -m asyncckpt``."""

import sys

from . import main

sys.exit(main())
