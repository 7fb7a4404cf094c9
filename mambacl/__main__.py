"""``python -m mambacl``: the same as the ``mambacl`` command."""
import sys

from mambacl.cli import main

sys.exit(main())
