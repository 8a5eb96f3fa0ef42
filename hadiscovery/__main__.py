import sys

from hadiscovery.cli import main

sys.exit(main())
