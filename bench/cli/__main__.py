"""`python -m bench.cli`: the svdbench command."""

import sys

from bench.cli.main import main

sys.exit(main())
