"""``python -m merge_callback.recipe``: the ``merge-callback-recipe`` command."""

import sys

from merge_callback.recipe.command import main

sys.exit(main())
