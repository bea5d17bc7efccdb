"""Score tables and learning curves from the committed run records. Nothing here is typed by hand.

    python results/tables.py --add runs/iql/<run>/     # copy a finished run's record.json into results/records/
    python results/tables.py                           # regenerate results/README.md and results/plots/*.png

Records live in `results/records/<algo>/<dataset id, / as ->__<tier>[__<variant>].json`, exactly as
the run wrote them (variant: `top10` for BC on the best 10% of episodes, `o2o` for IQL with an
online phase, or the name given to
`--add --variant NAME` for a run made to test a finding, e.g. `beta0`). For each record the table
shows the last evaluation and the best one (the evaluation with the highest mean over seeds), each as
mean ± std over seeds of the per-seed average over episodes; offline-to-online records read
`offline -> online`. Rows are grouped by dataset with the behaviour-cloning baselines first, so every
algorithm sits beside BC on the same data; the `data` column (the dataset's fingerprint) shows
whether two rows trained on the same bytes, and `preset` the resolved values that differ by dataset.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
RECORDS = HERE / "records"
PLOTS = HERE / "plots"
FINDINGS = HERE / "findings.md"


# Resolved config values shown in the `preset` column: the ones presets set per domain or dataset.
PRESET_KEYS = {
    "iql": ("expectile", "beta"),
    "cql": ("cql_alpha", "cql_lagrange", "normalize_rewards", "reward_scale"),
    "cal_ql": ("cql_alpha", "cql_lagrange", "normalize_rewards", "reward_scale", "mixing_ratio"),
    "dt": ("target_return", "rtg_scale"),
    "bc": ("top_fraction",),
    "famo2o": ("expectile", "beta_min", "beta_max"),
}


def top_fraction(record: dict) -> float:
    return float(record.get("config", {}).get("top_fraction", 1.0)) if record["algorithm"] == "bc" else 1.0


def variant(record: dict) -> str:
    """'' for the algorithm itself, 'top10' for BC on the best 10% of episodes, else the name the
    record was added under (kept in memory as `_variant`, never written into the record)."""
    if record.get("_variant"):
        return record["_variant"]
    if record["algorithm"] == "iql" and record.get("online_steps", 0) > 0:
        return "o2o"  # IQL offline-to-online, beside the offline record of the same budget
    return f"top{round(100 * top_fraction(record))}" if top_fraction(record) < 1.0 else ""


def label(record: dict) -> str:
    if record["algorithm"] == "bc" and not record.get("_variant"):
        return f"{100 * top_fraction(record):g}% BC" if variant(record) else "BC"
    return f"{record['algorithm']} [{variant(record)}]" if variant(record) else record["algorithm"]


def load(path: Path) -> dict:
    record = json.loads(path.read_text())
    parts = path.stem.split("__")
    if len(parts) > 2 and parts[2] != variant(record):
        record["_variant"] = parts[2]
    return record


def record_name(record: dict) -> Path:
    suffix = f"__{variant(record)}" if variant(record) else ""
    return RECORDS / record["algorithm"] / f"{record['dataset'].replace('/', '-')}__{record['tier']}{suffix}.json"


def preset(record: dict) -> str:
    config = record.get("config", {})
    return ", ".join(f"{k} {config[k]}" for k in PRESET_KEYS.get(record["algorithm"], ()) if k in config)


def add(run_dir: Path, name: str | None = None) -> Path:
    record = json.loads((run_dir / "record.json").read_text())
    if name:
        record["_variant"] = name
    if not record.get("evaluations"):
        raise SystemExit(f"{run_dir}: the record has no evaluation yet")
    online = record.get("online_steps", 0) > 0
    phase, done = ("online", record["online_steps"]) if online else ("offline", record["total_steps"])
    last = record["evaluations"][-1]
    if last["phase"] != phase or last["step"] < done:
        raise SystemExit(
            f"{run_dir}: the run has not finished (last evaluation: {last['phase']} step {last['step']}; "
            f"expected {phase} step {done})"
        )
    target = record_name(record)
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(run_dir / "record.json", target)
    return target


def seed_scores(entry: dict) -> np.ndarray:
    return np.asarray(entry["normalized"]).mean(1)


def fmt(scores: np.ndarray) -> str:
    return f"{scores.mean():.1f} ± {scores.std():.1f}"


def row(record: dict) -> str:
    evals = record["evaluations"]
    offline = [e for e in evals if e["phase"] == "offline"]
    online = [e for e in evals if e["phase"] == "online"]
    last = fmt(seed_scores(evals[-1]))
    best_entry = max(evals, key=lambda e: seed_scores(e).mean())
    best = fmt(seed_scores(best_entry))
    change = ""  # what the online phase added, per seed, then mean ± std over seeds
    if online and offline:
        last = f"{fmt(seed_scores(offline[-1]))} -> {last}"
        diff = seed_scores(evals[-1]) - seed_scores(offline[-1])
        change = f"{diff.mean():+.1f} ± {diff.std():.1f}"
    budget = f"{record['total_steps']:,} updates"
    if record.get("online_steps"):
        budget += f" + {record['online_steps']:,} env steps"
    success = ""
    if "success" in evals[-1]:
        success = f"{100 * np.mean(evals[-1]['success']):.0f}%"
    cmd = "python " + " ".join(record["command"])
    code = record["commit"] + (" (dirty)" if record["dirty"] else "")
    # evaluation speed from the last evaluation (compiled by then); older records did not time it
    speed = f"{evals[-1]['episodes_per_s']:.2f}" if "episodes_per_s" in evals[-1] else ""
    data = record.get("dataset_fingerprint", "")[:8]
    length = f"{np.median(evals[-1]['lengths']):g}" if "lengths" in evals[-1] else ""
    return (
        f"| {label(record)} | {record['dataset']} | {last} | {change} | {best} | {length} | {success} | "
        f"{record['num_seeds']} | {budget} | {record['tier']} | {record['device']} | "
        f"{record['wall_time_s'] / 60:.0f} min | {speed} | {code} | {data} | {preset(record)} | `{cmd}` |"
    )


def order(record: dict) -> tuple:
    """Grouped by dataset; BC, then filtered BC, then the algorithms by name."""
    return (record["dataset"], record["algorithm"] != "bc", -top_fraction(record), record["algorithm"])


def plot(record: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.2))
    for phase, offset in (("offline", 0), ("online", record["total_steps"])):
        evals = [e for e in record["evaluations"] if e["phase"] == phase]
        if not evals:
            continue
        steps = np.array([e["step"] for e in evals]) + offset
        scores = np.stack([seed_scores(e) for e in evals])  # (evaluations, seeds)
        ax.plot(steps, scores.mean(1), label=phase)
        ax.fill_between(steps, scores.min(1), scores.max(1), alpha=0.2)
    ax.set_xlabel("updates (+ online env steps)")
    ax.set_ylabel("normalized score")
    ax.set_title(f"{label(record)} on {record['dataset']} ({record['num_seeds']} seeds)", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def generate() -> str:
    records = [load(p) for p in sorted(RECORDS.rglob("*.json"))]
    lines = [
        "# Results",
        "",
        "Generated by `python results/tables.py` from `results/records/`; every record is the unedited "
        "`record.json` of a run of the committed code, and the command that made it is in the last column. "
        "Scores are normalized: 100 * (R - R_min) / (R_max - R_min), with D4RL's reference returns for "
        "the locomotion robots and Minari's reference scores for the maze sets. Last = the final evaluation, "
        "best = the evaluation with the highest mean over seeds; both mean ± std over seeds. Tiers never mix: "
        "`short` is any budget below the paper's (stated in the budget column). Online change (offline-to-online "
        "rows): the last evaluation minus the last offline one, per seed, then mean ± std over seeds. "
        "Eval episodes/s: the last evaluation's episodes (all seeds) over its wall time, environments included; "
        "commit: the code the run executed, `(dirty)` if common/, datasets/ or the algorithm file had "
        "uncommitted changes when it started; median length: the median episode length (steps) of the last evaluation; "
        "data: the first 8 hex digits of the dataset's fingerprint (rows with the same value trained on the same "
        "bytes; datasets/README.md lists the current builds'); preset: the resolved values the presets set.",
        "",
    ]
    for tier in ("paper", "short"):
        rows = sorted((r for r in records if r["tier"] == tier), key=order)
        if not rows:
            continue
        lines += [
            f"## Tier: {tier}",
            "",
            "| algorithm | dataset | last | online change | best | median length | success | seeds | budget | tier "
            "| device | wall time | eval episodes/s | commit | data | preset | command |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        lines += [row(r) for r in rows] + [""]
    if not records:
        lines.append("No records yet.")
    if FINDINGS.exists():  # prose explaining the numbers above; each number in it names its record
        lines += [FINDINGS.read_text().strip(), ""]
    PLOTS.mkdir(exist_ok=True)
    for r in sorted(records, key=order):
        name = record_name(r).stem
        plot(r, PLOTS / f"{r['algorithm']}__{name}.png")
        lines.append(f"![{label(r)} {r['dataset']}](plots/{r['algorithm']}__{name}.png)")
    lines += ["", "Update throughput: [throughput/README.md](throughput/README.md).", ""]
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--add", type=Path, nargs="*", default=[], help="run directories whose records to copy in")
    p.add_argument("--variant", default=None, help="file the added records under this name (a run testing a finding)")
    a = p.parse_args(argv)
    for run_dir in a.add:
        print(f"added {add(run_dir, a.variant)}")
    print(write())


def write() -> str:
    """Regenerate results/README.md (atomically) and the plots; returns the text."""
    text = generate()
    tmp = HERE / ".README.md.tmp"
    tmp.write_text(text)
    tmp.replace(HERE / "README.md")
    return text


if __name__ == "__main__":
    sys.exit(main())
