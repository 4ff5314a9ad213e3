"""Puts the repository root, not launch/, first on ``sys.path`` when a launch script is run by path.

``python -m launch.train`` needs nothing of this: Python puts the working directory first on
``sys.path`` and ``import train`` finds the ``train`` package. But ``deepspeed launch/train.py``,
``torchrun launch/train.py`` and ``python launch/eval.py`` run a *file*, and Python then puts the
file's folder, launch/, first: ``import train`` would find launch/train.py (the script itself)
instead of the package, and a checkout that is not pip-installed would find no package at all.

So each launch script, only when it runs as a file (``if not __package__``), imports this module
under its top-level name ``by_path`` (launch/ is on ``sys.path`` then, so that import works without
any path edit of its own). Importing it swaps launch/ for the repository root.
"""

import sys
from pathlib import Path

LAUNCH_DIR = Path(__file__).resolve().parent

sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != LAUNCH_DIR]
sys.path.insert(0, str(LAUNCH_DIR.parent))
