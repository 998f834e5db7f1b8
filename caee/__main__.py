"""``python -m caee <command> ...`` (also what torchrun runs: ``torchrun ... -m caee train-cgnet ...``)."""
import sys

from caee.cli import main

if __name__ == "__main__":
    sys.exit(main())
