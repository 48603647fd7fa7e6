import sys

from aax.cli import main

sys.exit(main())
