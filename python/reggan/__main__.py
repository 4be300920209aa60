import sys

from reggan.cli import main

sys.exit(main())
