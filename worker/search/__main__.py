"""`python -m worker.search run SPEC.json --out DIR`: see cli.py."""

import sys

from .cli import main

sys.exit(main())
