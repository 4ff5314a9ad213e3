"""``launch/train.py`` with the stand-in model and loader (tests/toy_model.py), for subprocess tests."""

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from launch.train import main  # noqa: E402
from tests.toy_model import build_toy_loader, build_toy_model, build_toy_val_batch  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(model_factory=build_toy_model, loader_factory=build_toy_loader,
                  val_batch_factory=build_toy_val_batch))
