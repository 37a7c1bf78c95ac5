"""`python -m loraforge ...` (and `torchrun -m loraforge ...`): the same as the `loraforge` command."""

import sys

from loraforge.cli import main

sys.exit(main())
