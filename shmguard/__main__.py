import sys

from .lean import main

sys.exit(main())
