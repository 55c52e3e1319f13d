"""Entry point of ``python -m microbench`` and of the ``dflash-bench`` console script."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
