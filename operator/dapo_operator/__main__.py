"""`python -m dapo_operator ...` = `dapo-operator ...` (`dapo_operator.cli`)."""

import sys

from dapo_operator.cli import main

sys.exit(main())
