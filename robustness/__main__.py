import sys

from backbone.cli import run

sys.exit(run("robustness", sys.argv[1:]))
