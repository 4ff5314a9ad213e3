"""Each launch script starts both ways a user types it: ``python -m launch.X`` and ``python launch/X.py``.

Run as a file, Python puts launch/ first on ``sys.path`` and launch/train.py would shadow the ``train``
package (launch/by_path.py); these runs reach code that imports ``train``: the config check of
launch/train.py and the checkpoint check of launch/reshape_checkpoint.py, both failing with exit code 2
on a path that does not exist. The file form runs from another working directory, as a cluster job may.
"""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CASES = {
    "train": (["--config", "no-such-recipe.yaml"], "config error: "),
    "reshape_checkpoint": (["--src", "no-such-checkpoint"], "not a training checkpoint"),
}


def _run(argv: list[str], cwd: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run([sys.executable, *argv], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("script", sorted(CASES))
def test_module_form(script):
    args, message = CASES[script]
    r = _run(["-m", f"launch.{script}", *args], cwd=ROOT)
    assert r.returncode == 2, r.stderr
    assert message in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize("script", sorted(CASES))
def test_file_form(script, tmp_path):
    args, message = CASES[script]
    r = _run([os.path.join(ROOT, "launch", f"{script}.py"), *args], cwd=str(tmp_path))
    assert r.returncode == 2, r.stderr
    assert message in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize("form", ["module", "file"])
def test_help(form, tmp_path):
    argv = ["-m", "launch.train"] if form == "module" else [os.path.join(ROOT, "launch", "train.py")]
    r = _run([*argv, "--help"], cwd=ROOT if form == "module" else str(tmp_path))
    assert r.returncode == 0 and "--config" in r.stdout, r.stderr
