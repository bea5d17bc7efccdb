"""What several test files need: an algorithm file run as a user runs it, and a run directory read back."""

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def run_algorithm(algo: str, *flags, cwd=REPO, timeout: int = 300, env: dict | None = None):
    """`python algorithms/<algo>.py FLAGS` in a subprocess (the conftest's MINARI_DATASETS_PATH and
    compilation cache are inherited)."""
    env = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
    cmd = [sys.executable, str(REPO / "algorithms" / f"{algo}.py"), *map(str, flags)]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=cwd, env=env, timeout=timeout)


def snapshot(run_dir: Path) -> dict:
    """Every file of a run directory, as bytes: equal snapshots mean nothing was rewritten."""
    return {p.name: p.read_bytes() for p in sorted(Path(run_dir).iterdir()) if p.is_file()}


def only_run_dir(out: Path, algo: str) -> Path:
    """The one run directory an algorithm made under `out`."""
    dirs = sorted(p for p in Path(out).glob(f"{algo}/*") if p.is_dir())
    assert len(dirs) == 1, dirs
    return dirs[0]


def assert_policy_reloads(run_dir: Path) -> None:
    """`common.logging.load_policy` rebuilds the run's evaluation policy from its config.json and
    checkpoint alone, and evaluating it as the run did reproduces the record's last evaluation."""
    import json

    import numpy as np

    from common.logging import load_policy

    record = json.loads((Path(run_dir) / "record.json").read_text())
    last = record["evaluations"][-1]
    loaded = load_policy(run_dir)
    assert (loaded.step, loaded.phase) == (last["step"], last["phase"])
    result = loaded.evaluate()
    assert np.round(result.returns, 3).tolist() == last["returns"]
    assert result.lengths.tolist() == last["lengths"]


def die_after_writes(monkeypatch, module, name: str, writes: int) -> None:
    """Make `module`'s atomic_write raise KeyboardInterrupt (a kill) right after its `writes`-th
    write of a file called `name`: a run stopped at a known point, in-process."""
    real, count = module.atomic_write, []

    def dying(path, data):
        real(path, data)
        if Path(path).name == name:
            count.append(path)
            if len(count) == writes:
                monkeypatch.setattr(module, "atomic_write", real)
                raise KeyboardInterrupt

    monkeypatch.setattr(module, "atomic_write", dying)
