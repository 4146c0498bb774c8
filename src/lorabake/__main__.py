import sys

from lorabake.cli import main

sys.exit(main())
