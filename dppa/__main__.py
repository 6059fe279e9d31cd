import sys

from dppa.cli import main

sys.exit(main())
