import sys

from backbone.cli import run

sys.exit(run("cam", sys.argv[1:]))
