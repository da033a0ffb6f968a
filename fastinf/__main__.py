"""``python -m fastinf ...`` is the same CLI as ``fastinf ...`` (so ``torchrun -m fastinf`` works)."""
import sys

from fastinf.cli.app import main

sys.exit(main())
