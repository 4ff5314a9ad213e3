"""``launch/train.py`` with the stand-in model and loader (tests/helpers/toy_model.py), for subprocess tests.

``--real-model`` (anywhere among the arguments) keeps the real model, loader and validation batch instead. Either
way the faults described in ``$CARE_TEST_FAULTS`` (tests/helpers/faults.py) are injected through the factories.
"""

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

from launch.train import main  # noqa: E402
from tests.helpers.faults import Faults, wrap_factories  # noqa: E402

if __name__ == "__main__":
    argv = sys.argv[1:]
    if "--real-model" in argv:
        from train.loop import default_factories

        argv.remove("--real-model")
        model_factory, loader_factory, val_batch_factory = default_factories()
    else:
        from tests.helpers.toy_model import build_toy_loader, build_toy_model, build_toy_val_batch

        model_factory, loader_factory, val_batch_factory = build_toy_model, build_toy_loader, build_toy_val_batch
    model_factory, loader_factory = wrap_factories(Faults.from_env(), model_factory, loader_factory)
    sys.exit(
        main(argv, model_factory=model_factory, loader_factory=loader_factory, val_batch_factory=val_batch_factory)
    )
