import sys

from smix.cli import run

sys.exit(run("robustness", sys.argv[1:]))
