import sys

from smix.cli import run

sys.exit(run("cam", sys.argv[1:]))
