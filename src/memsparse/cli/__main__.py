"""`python -m memsparse.cli ...` (torchrun launches, --jobs workers): the `memsparse` command."""

import sys

from . import main

sys.exit(main())
