"""``python -m fastinf.dist_score`` (and ``torchrun -m fastinf.dist_score``): the sharded scoring entry
point of the README. The implementation is ``fastinf.scoring.dist_score``."""
import sys

from fastinf.scoring.dist_score import main

if __name__ == "__main__":
    sys.exit(main())
