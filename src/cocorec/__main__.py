"""``python -m cocorec``: the ``cocorec`` command, also as torchrun launches it
(``torchrun --nproc_per_node=2 -m cocorec train ...``, see docs/scale.md)."""

import sys

from cocorec.cli import main

sys.exit(main())
