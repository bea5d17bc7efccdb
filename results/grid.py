"""Fill the benchmark grid: every (algorithm, dataset) cell of a tier, one run at a time, resumably.

    python results/grid.py --tier short --list                  # which cells are filed, started, missing
    python results/grid.py --tier short                          # run every missing cell
    python results/grid.py --tier short --max-minutes 170        # stop at 170 minutes; the same command continues
    python results/grid.py --tier paper --datasets local/hopper/medium-v0 --algorithms iql cql

A cell is one algorithm file with the tier's flags on one dataset. Its runs live under
`runs/grid/<tier>/<cell>/<dataset>/` (the run directory's own contract makes every run resumable).
For each cell in order: a record already filed in results/records/ with the cell's flags (and, where
the dataset is built here, its current fingerprint) is skipped; a finished run is filed; an
unfinished one continues with `--resume` (unless code a later fix changed made it: OLDER_CODE);
otherwise the run starts, building its dataset on first use. `--max-minutes` ends the command at
that wall time: the running cell is stopped (SIGTERM, then SIGKILL) and continues from its last
checkpoint at the next command, so every command must last longer than a cell needs to reach its
first checkpoint (one evaluation interval; RAVL and MOREC also checkpoint each epoch of their
dynamics model). A `mopo` cell starts on the `morec` cell's saved model (`--dynamics-path`) where
that cell's run here has one (of code since the cell's last fix): the same model, not trained twice.
Each finished run's record is filed with `results/tables.py`'s `add`, and the tables are
regenerated.

Tiers (never mixed in a table): `paper`, each paper's budget with 5 seeds; `short`, the CPU budgets
of DESIGN.md (about an hour or less per cell on 2 idle cores); `tiny`, seconds per cell on the test
datasets, for tests of this script only (never filed into results/records/ by default).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(REPO))
import tables  # noqa: E402

CORE = (
    "local/hopper/medium-v0",
    "local/walker2d/medium-replay-v0",
    "local/halfcheetah/medium-expert-v0",
    "local/pointmaze/medium-sparse-v0",
)


@dataclass(frozen=True)
class Budget:
    total_steps: int
    online_steps: int
    num_seeds: int
    eval_every: int | None = None  # None: the file's default (the paper's interval)
    flags: tuple[str, ...] = ()  # the tier's own flags (e.g. ReinFlow's environments per seed)


# MOREC's model, dynamics reward and rollouts scaled down for 2 CPU cores (untimed as a whole).
MOREC_SHORT = ("--model-max-epochs", "30", "--rollouts-per-epoch", "200", "--reward-iterations", "100",
               "--snapshot-interval", "5")  # fmt: skip
# cell -> (algorithm file, its own flags, budget per tier). Offline-to-online cells carry an online budget.
CELLS: dict[str, tuple[str, tuple[str, ...], dict[str, Budget]]] = {
    "bc": ("bc", ("--top-fraction", "1.0"), {"paper": Budget(1_000_000, 0, 5), "short": Budget(100_000, 0, 3)}),
    "bc10": ("bc", ("--top-fraction", "0.1"), {"paper": Budget(1_000_000, 0, 5), "short": Budget(100_000, 0, 3)}),
    "iql": ("iql", (), {"paper": Budget(1_000_000, 0, 5), "short": Budget(100_000, 0, 3)}),
    "cql": ("cql", (), {"paper": Budget(1_000_000, 0, 5), "short": Budget(10_000, 0, 2, 2000)}),
    "dt": ("dt", (), {"paper": Budget(100_000, 0, 5), "short": Budget(10_000, 0, 2, 2000)}),
    "cal_ql": ("cal_ql", (), {"paper": Budget(1_000_000, 1_000_000, 5), "short": Budget(10_000, 10_000, 2, 2000)}),
    "iql_o2o": ("iql", (), {"paper": Budget(1_000_000, 1_000_000, 5), "short": Budget(100_000, 50_000, 3)}),
    "famo2o": ("famo2o", (), {"paper": Budget(1_000_000, 1_000_000, 5), "short": Budget(100_000, 50_000, 3)}),
    # RAVL: agent updates (its dynamics model is trained first, capped by --model-max-epochs on the CPU).
    "ravl": (
        "ravl",
        (),
        {
            "paper": Budget(3_000_000, 0, 5),
            "short": Budget(10_000, 0, 2, flags=("--model-max-epochs", "20", "--rollouts-per-epoch", "5000")),
        },
    ),
    # MOREC-MOPO, and plain MOPO on the same model (--no-filter) beside it.
    "morec": (
        "morec",
        (),
        {
            "paper": Budget(3_000_000, 0, 5),
            "short": Budget(50_000, 0, 2, flags=MOREC_SHORT),
        },
    ),
    "mopo": (
        "morec",
        ("--no-filter",),
        {
            "paper": Budget(3_000_000, 0, 5),
            "short": Budget(50_000, 0, 2, flags=MOREC_SHORT),
        },
    ),
    # ReinFlow: pre-training updates + PPO environment steps; paper: 1000 iterations of 40 envs x 500 chunks x 4.
    "reinflow": (
        "reinflow",
        (),
        {
            "paper": Budget(300_000, 80_000_000, 5, flags=("--num-envs", "40")),
            "short": Budget(50_000, 100_000, 2, 10_000, flags=("--num-envs", "10", "--rollout-chunks", "100")),
        },
    ),
}
TINY_FLAGS = ("--hidden-dims", "32", "32", "--batch-size", "32", "--eval-episodes", "2", "--no-log")
# Seconds per cell (startup and compilation dominate); iql_o2o runs long enough online (about 20 s
# on 2 idle cores, checkpoints every 500 steps) that a test can stop and continue it several times.
TINY = {"bc": Budget(300, 0, 2, 100), "iql": Budget(300, 0, 2, 100), "iql_o2o": Budget(200, 5_000, 2, 500)}


@dataclass(frozen=True)
class Cell:
    name: str
    dataset: str
    tier: str
    algo: str
    flags: tuple[str, ...]  # everything after --dataset

    @property
    def title(self) -> str:
        return f"{self.name} on {self.dataset} ({self.tier})"

    def out_dir(self, runs: Path) -> Path:
        return runs / self.tier / self.name / self.dataset.replace("/", "-")


def cells_of(tier: str, datasets, names) -> list[Cell]:
    out = []
    for dataset in datasets:
        for name in names:
            algo, own, budgets = CELLS[name]
            budget = TINY.get(name) if tier == "tiny" else budgets.get(tier)
            if budget is None:
                continue
            flags = ["--total-steps", str(budget.total_steps), "--num-seeds", str(budget.num_seeds)]
            if algo in ("iql", "cal_ql", "famo2o", "reinflow"):  # always explicit: the files' defaults differ
                flags += ["--online-steps", str(budget.online_steps)]
            if budget.eval_every:
                flags += ["--eval-every", str(budget.eval_every)]
            flags += list(budget.flags) + list(own) + (list(TINY_FLAGS) if tier == "tiny" else [])
            out.append(Cell(name, dataset, tier, algo, tuple(flags)))
    return out


def flag_values(flags) -> dict[str, str]:
    """{"total_steps": "100000", ...} for the `--name value` pairs (multi-value flags joined by spaces)."""
    values, key = {}, None
    for f in flags:
        if f.startswith("--"):
            key = f[2:].replace("-", "_")
            values[key] = ""
        elif key is not None:
            values[key] = f"{values[key]} {f}".strip()
    return values


def same_value(config_value, text: str) -> bool:
    if text == "":
        return config_value is True
    if isinstance(config_value, (list, tuple)):
        return " ".join(map(str, config_value)) == text
    try:
        return float(config_value) == float(text)
    except (TypeError, ValueError):
        return str(config_value) == text


# The name results/tables.py files a cell's record under (its variant), where it is not the file's own.
VARIANTS = {"bc10": "top10", "iql_o2o": "o2o", "mopo": "mopo"}


def matches(record: dict, cell: Cell) -> bool:
    """The record was made by this cell's file, dataset and flags (and files under the cell's variant)."""
    if record.get("algorithm") != cell.algo or record.get("dataset") != cell.dataset:
        return False
    if tables.variant(record) != VARIANTS.get(cell.name, ""):  # an experiment filed under its own name is no cell
        return False
    config = record.get("config", {})
    return all(k in config and same_value(config[k], v) for k, v in flag_values(cell.flags).items() if k != "no_log")


# Each core dataset's current full build (datasets/README.md): records of older builds are not counted
# in results/README.md's aggregate and missing cells (the table rows still show them, column `data`).
BUILDS = {
    "local/hopper/medium-v0": "0f6e35fb",
    "local/walker2d/medium-replay-v0": "ad7928be",
    "local/pointmaze/medium-sparse-v0": "439406b6",
    "local/halfcheetah/medium-expert-v0": "30a3c74a",
}


def current(record: dict) -> bool:
    build = BUILDS.get(record["dataset"])
    return build is None or record.get("dataset_fingerprint", "").startswith(build)


# Records made before a fix that moves a cell's scores (results/findings.md, "Which code"), by the
# commits that made them: such a cell counts as missing and is run again (its row stays in the tables,
# column `commit`, until the new record replaces it).
OLDER_CODE = {
    "ravl": ("3c919d5", "b1fbd44"),  # before fe7a080 and 306c2f5: critic init, model keys
    "morec": ("d861e37", "b1fbd44"),  # before fe7a080, 306c2f5, 869e810: the model's bootstrap, scaler, keys, init
    "mopo": ("d861e37", "b1fbd44"),
}


def older_code(record: dict, cell: Cell) -> bool:
    return record.get("commit", "")[:7] in OLDER_CODE.get(cell.name, ())


def counts(record: dict, cell: Cell) -> bool:
    """The record fills this cell: its file and flags, the current build, code since the cell's last fix."""
    return matches(record, cell) and current(record) and not older_code(record, cell)


def recorded(cell: Cell, records: list[dict]) -> bool:
    """From the records alone (no dataset is read): a record of this cell on the current build and code."""
    return any(counts(r, cell) for r in records)


def current_fingerprint(dataset: str) -> str | None:
    """The fingerprint of the dataset as built here, None if it is not built (then nothing is built)."""
    from common.data import dataset_dir, load_dataset

    if not (dataset_dir(dataset) / "data").exists():
        return None
    return load_dataset(dataset, to_device=False)[1].fingerprint


def filed(cell: Cell, records: Path, fingerprints: dict) -> Path | None:
    for path in sorted(records.glob(f"{cell.algo}/{cell.dataset.replace('/', '-')}__*.json")):
        record = tables.load(path)  # with the name it was filed under
        if not matches(record, cell) or older_code(record, cell):
            continue
        if cell.dataset not in fingerprints:
            fingerprints[cell.dataset] = current_fingerprint(cell.dataset)
        if fingerprints[cell.dataset] in (None, record.get("dataset_fingerprint")):
            return path
    return None


def run_dirs(cell: Cell, runs: Path) -> list[Path]:
    """The cell's run directories that match its flags, oldest first, except those of code a later fix
    changed (OLDER_CODE): such a run is neither continued nor its model shared."""
    found = []
    for record_path in sorted(cell.out_dir(runs).glob("*/*/record.json")):
        try:
            record = json.loads(record_path.read_text())
            if matches(record, cell) and not older_code(record, cell):
                found.append(record_path.parent)
        except (OSError, json.JSONDecodeError):
            continue
    return found


def status(cell: Cell, runs: Path, records: Path, fingerprints: dict) -> str:
    if filed(cell, records, fingerprints):
        return "filed"
    dirs = run_dirs(cell, runs)
    if not dirs:
        return "missing"
    record = json.loads((dirs[-1] / "record.json").read_text())
    if record.get("finished"):
        return "finished, not filed"
    last = record["evaluations"][-1] if record.get("evaluations") else None
    return f"started ({last['phase']} step {last['step']})" if last else "started"


def file_record(cell: Cell, run_dir: Path, records: Path) -> Path:
    old = tables.RECORDS
    tables.RECORDS = records
    try:
        return tables.add(run_dir)
    finally:
        tables.RECORDS = old


def relative(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(REPO))
    except ValueError:
        return str(path)


def stop(proc: subprocess.Popen) -> None:
    """SIGTERM to a cell's run (it keeps its last checkpoint and exits: resumable), SIGKILL after 30 s."""
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


# A cell that runs on another cell's trained model (same dataset, tier and model flags) where that
# cell's run on this machine has saved it: MOPO on MOREC's dynamics model and dynamics reward, trained
# once instead of twice. The model's random keys come from --dynamics-seed alone, so the run is the
# one a model of its own would give on this machine (the same model; results/findings.md).
SHARES_MODEL = {"mopo": ("morec", "dynamics.msgpack")}


def shared_model(cell: Cell, runs: Path) -> Path | None:
    """The saved model of the newest run of the cell this one shares a model with, if any."""
    if cell.name not in SHARES_MODEL:
        return None
    source, filename = SHARES_MODEL[cell.name]
    twins = cells_of(cell.tier, [cell.dataset], [source])  # none where the tier has no such cell
    saved = [d / filename for twin in twins for d in run_dirs(twin, runs) if (d / filename).is_file()]
    return saved[-1] if saved else None


def command(cell: Cell, runs: Path) -> list[str]:
    """The cell's command: its newest run continued, or a new one (on a shared model where saved)."""
    script = f"algorithms/{cell.algo}.py"
    dirs = run_dirs(cell, runs)
    if dirs:
        return [sys.executable, script, "--resume", relative(dirs[-1])]
    model = shared_model(cell, runs)
    reuse = ["--dynamics-path", relative(model)] if model else []
    out = relative(cell.out_dir(runs))
    return [sys.executable, script, "--dataset", cell.dataset, *cell.flags, *reuse, "--out-dir", out]


def run_cell(cell: Cell, runs: Path, deadline: float | None) -> tuple[Path | None, str]:
    """Run or continue one cell until it finishes or the deadline passes: (run dir, outcome)."""
    out = cell.out_dir(runs)
    out.mkdir(parents=True, exist_ok=True)
    cmd = command(cell, runs)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    with open(out / "grid.log", "a") as log:
        log.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(cmd[1:])}\n")
        log.flush()
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        outcome = ""
        try:
            while proc.poll() is None:
                if deadline is not None and time.time() >= deadline:
                    stop(proc)
                    outcome = "stopped at the time limit"
                    break
                time.sleep(1.0)
        except KeyboardInterrupt:  # Ctrl-C or SIGTERM: the run is in its own session, so stop it too
            stop(proc)
            raise
    dirs = run_dirs(cell, runs)
    if outcome:
        return (dirs[-1] if dirs else None), outcome
    if proc.returncode != 0:
        tail = (out / "grid.log").read_text().strip().splitlines()[-1:] or [""]
        return (dirs[-1] if dirs else None), f"failed (exit {proc.returncode}): {tail[0][:300]}"
    return (dirs[-1] if dirs else None), "finished"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tier", choices=("paper", "short", "tiny"), required=True)
    p.add_argument("--datasets", nargs="+", default=list(CORE), help="default: the core grid")
    p.add_argument("--algorithms", nargs="+", default=list(CELLS), choices=list(CELLS), metavar="CELL",
                   help=f"cells to run, in this order (default: all: {', '.join(CELLS)})")  # fmt: skip
    p.add_argument("--max-minutes", type=float, default=None, help="stop (resumably) after this wall time")
    p.add_argument("--runs", type=Path, default=REPO / "runs" / "grid", help="where the cells' runs live")
    p.add_argument("--records", type=Path, default=None, help="where records are filed (default: results/records)")
    p.add_argument("--list", action="store_true", help="only show each cell's status")
    a = p.parse_args(argv)
    if a.tier == "tiny" and a.records is None and not a.list:
        p.error("the tiny tier is for tests: give --records (never results/records)")
    if a.max_minutes is not None and a.max_minutes <= 0:
        p.error("--max-minutes must be positive")
    records = a.records or tables.RECORDS
    deadline = None if a.max_minutes is None else time.time() + 60 * a.max_minutes
    cells, fingerprints = cells_of(a.tier, a.datasets, a.algorithms), {}
    if a.list:
        for cell in cells:
            print(f"{cell.title}: {status(cell, a.runs, records, fingerprints)}")
        return 0
    failed = 0
    for cell in cells:
        if filed(cell, records, fingerprints):
            print(f"{cell.title}: filed", flush=True)
            continue
        if deadline is not None and time.time() >= deadline:
            print(f"time limit reached; run the same command again to continue ({cell.title} is next)", flush=True)
            return 3
        print(f"{cell.title}: running ({relative(cell.out_dir(a.runs))}/grid.log)", flush=True)
        run_dir, outcome = run_cell(cell, a.runs, deadline)
        print(f"{cell.title}: {outcome}", flush=True)
        if outcome == "stopped at the time limit":
            return 3
        if outcome != "finished":
            failed += 1
            continue
        print(f"{cell.title}: filed {relative(file_record(cell, run_dir, records))}", flush=True)
        fingerprints.pop(cell.dataset, None)  # built by the run if it was missing
        if a.records is None:
            tables.write()
    return 1 if failed else 0


def interrupted(signum, frame):
    raise KeyboardInterrupt


if __name__ == "__main__":
    # SIGINT too: a command started in the background without job control (`cmd &` in a script)
    # inherits SIGINT as ignored, and Python then installs no KeyboardInterrupt for it.
    signal.signal(signal.SIGINT, interrupted)
    signal.signal(signal.SIGTERM, interrupted)
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("interrupted: the running cell stopped at its last checkpoint; the same command continues it", flush=True)
        sys.exit(130)
