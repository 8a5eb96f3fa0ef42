"""`python -m policy`: the policy worker and its operator commands."""

import sys

from policy.cli import main

sys.exit(main())
