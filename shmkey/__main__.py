"""``python -m shmkey``: the same as the ``shmkey`` command."""
import sys

from .cli import main

sys.exit(main())
