"""``python -m cskd`` (and ``torchrun -m cskd``) runs the command line."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
