import sys

from smix.cli import main

sys.exit(main())
