import sys

from compconv.cli import main

sys.exit(main())
