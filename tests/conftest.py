"""Fixtures that several test files share. Helper modules that are not fixtures (stand-in models and loaders,
fault injection, the training entries run as subprocesses, shard builders) are in tests/helpers/."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import pytest

from tests.helpers.raw_shards import valid_raw, write_raw_shard
from tests.helpers.train_harness import tiny_shards as write_tiny_shards


@pytest.fixture(scope="session")
def tiny_shards(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    """Synthetic 64x64 shards (3 train, 1 val) for configs/tiny.yaml, written once per session (the tests only
    read them); the ``data.*_shards=`` overrides that point a run at them."""
    return write_tiny_shards(tmp_path_factory.mktemp("synthetic"))


RawShards = Callable[..., tuple[str, list[str]]]


@pytest.fixture
def raw_shards(tmp_path: Path) -> RawShards:
    """Writes raw shards into the test's tmp dir: ``raw_shards([5, 6], make=valid_raw, prefix="s")`` gives
    shard ``i`` ``sizes[i]`` samples made by ``make(n)`` (n counting over all shards) and returns
    (brace pattern, every key in order)."""

    def write(sizes: list[int], make: Callable[[int], dict] = valid_raw, prefix: str = "s") -> tuple[str, list[str]]:
        keys: list[str] = []
        n = 0
        for i, size in enumerate(sizes):
            samples = [make(n + j) for j in range(size)]
            n += size
            write_raw_shard(str(tmp_path / f"{prefix}-{i:06d}.tar"), samples)
            keys += [s["__key__"] for s in samples]
        return str(tmp_path / f"{prefix}-{{000000..{len(sizes) - 1:06d}}}.tar"), keys

    return write
