import sys

from backbone.cli import run

sys.exit(run("pretrain", sys.argv[1:]))
