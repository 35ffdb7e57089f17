import sys

from smix.cli import run

sys.exit(run("pretrain", sys.argv[1:]))
