"""``python -m merge_callback.cli``: the ``merge-callback`` command."""

import sys

from merge_callback.cli.commands import main

sys.exit(main())
