"""`python -m placement MODEL ...` is `offload-plan MODEL ...`."""
import sys

from .cli import main

sys.exit(main())
