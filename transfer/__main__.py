import sys

from smix.cli import run

sys.exit(run("transfer", sys.argv[1:]))
