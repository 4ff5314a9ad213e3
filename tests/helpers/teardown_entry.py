"""tests/helpers/train_entry.py, reporting at interpreter exit whether the process group is still up.

``atexit`` runs after ``sys.exit``: what it prints is the state the interpreter is torn down in.
"""

import atexit
import os
import runpy

import torch.distributed as dist

atexit.register(lambda: print(f"process group up at exit: {dist.is_initialized()}", flush=True))
runpy.run_path(os.path.join(os.path.dirname(os.path.abspath(__file__)), "train_entry.py"), run_name="__main__")
