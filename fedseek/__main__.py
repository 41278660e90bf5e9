"""`python -m fedseek`: the `fedseek` command (fedseek.ops.cli)."""

import sys

from fedseek.ops.cli import main

if __name__ == "__main__":
    sys.exit(main())
