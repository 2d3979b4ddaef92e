import sys

from deployline.cli import main

sys.exit(main())
