"""lamp-grid's entry point: `python experiments.py VERB ...`, and the `lamp-grid`
command. The command line itself is grid/cli.py; `--help` lists the verbs."""

import sys

from grid.cli import main

if __name__ == "__main__":
    sys.exit(main())
