"""`python -m offload ...`: the `offload` command (offload/cli)."""
import sys

from offload.cli import main

sys.exit(main())
