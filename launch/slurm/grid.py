"""Sweep grids for SLURM arrays: list the sets, print the ``sbatch --array`` line, resolve one task.

A grid file (e.g. ``configs/ablations.yaml``)::

    name: ablations                 # run names are <name>-<index>-<set name>
    base: configs/flux_full.yaml    # recipe the sets apply to (a base given on the command line wins)
    common: [train.steps=10000]     # overrides for every set (optional)
    sets:
      - {name: full, overrides: []}
      - {name: k1, overrides: [model.router.top_k=1]}

Layering for task ``i``: base recipe <- ``common`` <- set ``i``'s overrides <- command-line overrides <-
``run.name=<name>-<i>-<set>`` (last, so a run directory always belongs to exactly one set).

    python -m launch.slurm.grid configs/ablations.yaml [BASE.yaml] [key=value ...]
        prints the sets with their indices, checks every set against the config schema, and prints
        the exact ``sbatch --array=0-N ...`` line to submit.
    python -m launch.slurm.grid configs/ablations.yaml [BASE.yaml] [key=value ...] --task I --nul
        prints task I's training arguments (config path, then overrides), NUL-separated, for
        launch/slurm/sweep.sbatch.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import sys
from dataclasses import dataclass
from typing import Optional

from omegaconf import OmegaConf

from train.config import ConfigError, load_config

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


class GridError(ValueError):
    pass


@dataclass(frozen=True)
class GridSet:
    name: str
    overrides: tuple[str, ...]


@dataclass(frozen=True)
class Grid:
    path: str
    name: str
    base: Optional[str]
    common: tuple[str, ...]
    sets: tuple[GridSet, ...]

    def run_name(self, index: int) -> str:
        return f"{self.name}-{index}-{self.sets[index].name}"

    def task(self, index: int, base: Optional[str] = None, extra: tuple[str, ...] = ()) -> tuple[str, list[str]]:
        """(config path, overrides) of array task ``index``."""
        if not 0 <= index < len(self.sets):
            raise GridError(f"{self.path}: task {index} out of range (0..{len(self.sets) - 1})")
        config = base or self.base
        if not config:
            raise GridError(f"{self.path}: no `base:` recipe and none given on the command line")
        return config, [*self.common, *self.sets[index].overrides, *extra, f"run.name={self.run_name(index)}"]


def _overrides(value, where: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(v, str) and "=" in v for v in value):
        raise GridError(f"{where}: must be a list of key=value strings, got {value!r}")
    for v in value:
        if v.split("=", 1)[0].strip() == "run.name":
            raise GridError(f"{where}: run.name is set by the grid (<grid>-<index>-<set>)")
    return tuple(value)


def load_grid(path: str) -> Grid:
    raw = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    if not isinstance(raw, dict):
        raise GridError(f"{path}: expected a mapping with name/base/sets")
    # `bench`: what bench/ablations.py does beyond training the sets (its data, claims, interventions)
    unknown = set(raw) - {"name", "base", "common", "sets", "bench"}
    if unknown:
        raise GridError(f"{path}: unknown keys {sorted(unknown)} (allowed: name, base, common, sets, bench)")
    name = str(raw.get("name") or os.path.splitext(os.path.basename(path))[0])
    if not NAME_RE.match(name):
        raise GridError(f"{path}: name '{name}' must match {NAME_RE.pattern}")
    sets, seen = [], set()
    for i, s in enumerate(raw.get("sets") or []):
        if not isinstance(s, dict) or "name" not in s or set(s) - {"name", "overrides"}:
            raise GridError(f"{path}: sets[{i}] must be {{name: ..., overrides: [...]}}, got {s!r}")
        sname = str(s["name"])
        if not NAME_RE.match(sname):
            raise GridError(f"{path}: sets[{i}].name '{sname}' must match {NAME_RE.pattern}")
        if sname in seen:
            raise GridError(f"{path}: duplicate set name '{sname}'")
        seen.add(sname)
        sets.append(GridSet(sname, _overrides(s.get("overrides"), f"{path}: sets[{i}].overrides")))
    if not sets:
        raise GridError(f"{path}: no sets")
    return Grid(
        path=path,
        name=name,
        base=raw.get("base"),
        common=_overrides(raw.get("common"), f"{path}: common"),
        sets=tuple(sets),
    )


def split_args(args: list[str]) -> tuple[Optional[str], tuple[str, ...]]:
    """``[BASE.yaml] [key=value ...]`` -> (base or None, overrides)."""
    base = None
    if args and "=" not in args[0] and args[0].endswith((".yaml", ".yml")):
        base, args = args[0], args[1:]
    bad = [a for a in args if "=" not in a]
    if bad:
        raise GridError(f"expected key=value overrides after the grid (and optional base recipe), got {bad}")
    return base, tuple(args)


def check_task(grid: Grid, index: int, base: Optional[str], extra: tuple[str, ...], world_size: int) -> Optional[str]:
    """The config error of task ``index`` for ``world_size`` processes (None when it validates)."""
    config, overrides = grid.task(index, base, extra)
    saved = os.environ.get("WORLD_SIZE")
    os.environ["WORLD_SIZE"] = str(world_size)  # validate_config checks ep_size against it
    try:
        load_config(config, overrides)
    except (ConfigError, FileNotFoundError) as e:
        return str(e)
    finally:
        if saved is None:
            del os.environ["WORLD_SIZE"]
        else:
            os.environ["WORLD_SIZE"] = saved
    return None


def sbatch_line(grid: Grid, base: Optional[str], extra: tuple[str, ...], max_parallel: int = 0) -> str:
    array = f"0-{len(grid.sets) - 1}" + (f"%{max_parallel}" if max_parallel else "")
    args = [grid.path] + ([base] if base else []) + list(extra)
    return f"mkdir -p runs/slurm && sbatch --array={array} launch/slurm/sweep.sbatch " + shlex.join(args)


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("grid")
    p.add_argument("args", nargs="*", help="[BASE.yaml] [key=value ...] applied to every set")
    p.add_argument("--task", type=int, default=None, help="print this array task's training arguments")
    p.add_argument("--nul", action="store_true", help="with --task: NUL-separated (for the sbatch script)")
    p.add_argument("--max-parallel", type=int, default=0, help="add %%N to --array (at most N tasks at once)")
    p.add_argument("--no-check", action="store_true", help="do not validate every set against the config schema")
    p.add_argument(
        "--world-size",
        type=int,
        default=int(os.environ.get("WORLD_SIZE", "8")),
        help="processes per task the sets are checked for (ep_size must divide it; default 8)",
    )
    a = p.parse_args(argv)
    try:
        grid = load_grid(a.grid)
        base, extra = split_args(a.args)
        if a.task is not None:
            config, overrides = grid.task(a.task, base, extra)
            items = [config, *overrides]
            sys.stdout.write("".join(x + "\0" for x in items) if a.nul else shlex.join(items) + "\n")
            return 0
    except GridError as e:
        print(f"grid error: {e}", file=sys.stderr)
        return 2
    config = base or grid.base
    print(
        f"grid {grid.name} ({grid.path}): {len(grid.sets)} sets on {config}"
        + (f", common {' '.join(grid.common)}" if grid.common else "")
        + (f", extra {' '.join(extra)}" if extra else "")
        + ("" if a.no_check else f"; checked for {a.world_size} processes per task")
    )
    width = max(len(grid.run_name(i)) for i in range(len(grid.sets)))
    errors = 0
    for i, s in enumerate(grid.sets):
        err = None if a.no_check else check_task(grid, i, base, extra, a.world_size)
        errors += err is not None
        print(
            f"  {i:>3}  {grid.run_name(i):<{width}}  {' '.join(s.overrides) or '(base recipe)'}"
            + (f"\n       CONFIG ERROR: {err}" if err else "")
        )
    if errors:
        print(f"{errors} set(s) do not validate; fix them before submitting", file=sys.stderr)
        return 2
    print("submit (from the repository root):")
    print("  " + sbatch_line(grid, base, extra, a.max_parallel))
    print(
        "(resources go before the script, e.g. --nodes=1 --gpus-per-node=8 --ntasks-per-node=8 --cpus-per-task=12"
        " --time=24:00:00; see docs/SLURM.md)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
