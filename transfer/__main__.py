import sys

from backbone.cli import run

sys.exit(run("transfer", sys.argv[1:]))
