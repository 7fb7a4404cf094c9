"""``python -m mambacl``: the same as the ``mambacl`` command."""
import sys

from mambacl.experiments.cli import main

sys.exit(main())
