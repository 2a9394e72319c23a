"""`python -m hibari ...` is the `hibari` command."""
import sys

from hibari.cli import main

sys.exit(main())
