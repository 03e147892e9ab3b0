"""``python -m SAM2FewShotLib.cli``: the sam2fewshot command without the installed script."""

import sys

from .main import main

sys.exit(main())
