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

The aggregate over the core grid's datasets is rliable's (Agarwal et al. 2021): the interquartile
mean with a stratified-bootstrap 95% interval, written here in numpy because rliable 1.2.0 does not
import beside pandas 3 (its dependency arch 7.2.0 fails in `deprecate_kwarg`, checked 2026-12-02).
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
PUBLISHED = HERE / "published.json"


# Resolved config values shown in the `preset` column: the ones presets set per domain or dataset.
PRESET_KEYS = {
    "iql": ("expectile", "beta"),
    "cql": ("cql_alpha", "cql_lagrange", "normalize_rewards", "reward_scale"),
    "cal_ql": ("cql_alpha", "cql_lagrange", "normalize_rewards", "reward_scale", "mixing_ratio"),
    "dt": ("target_return", "rtg_scale"),
    "bc": ("top_fraction",),
    "famo2o": ("expectile", "beta_min", "beta_max"),
    "reinflow": ("actor_lr", "critic_lr", "sigma_min", "sigma_max"),
    "ravl": ("num_critics", "eta", "rollout_length", "dataset_ratio"),
    "morec": ("penalty_coef", "filter", "no_filter"),
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
    if record["algorithm"] == "morec" and record.get("config", {}).get("no_filter"):
        return "mopo"  # plain MOPO on the same model and budget, beside MOREC
    if record["algorithm"] == "ravl" and record.get("config", {}).get("true_dynamics"):
        config = record["config"]  # the edge-of-reach test: rollouts in the simulator, with or without pessimism
        return f"true-n{config['num_critics']}-eta{config['eta']:g}"
    if "sweep" in record:
        return "sweep"  # one file; `split_sweep` makes one row per grid point
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


def load_all() -> list[dict]:
    return [part for path in sorted(RECORDS.rglob("*.json")) for part in split_sweep(load(path))]


def split_sweep(record: dict) -> list[dict]:
    """A --sweep record as one record per grid point (in memory): its seeds' rows of every
    evaluation, the point's values in the config, the point as the variant."""
    if "sweep" not in record:
        return [record]
    n, parts = len(record["seeds"]), []
    for g, point in enumerate(record["sweep"]["points"]):
        rows = slice(g * n, (g + 1) * n)
        evaluations = [
            {k: (v[rows] if k in ("returns", "normalized", "lengths", "success") else v) for k, v in e.items()}
            for e in record["evaluations"]
        ]
        part = {k: v for k, v in record.items() if k not in ("sweep", "final_per_point")}
        label = ",".join(f"{k}={v:g}" for k, v in point.items())
        name = f"{record['_variant']},{label}" if record.get("_variant") else label
        part.update(evaluations=evaluations, config={**record["config"], **point}, _variant=name)
        parts.append(part)
    return parts


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


# --- the aggregate over the grid's datasets (rliable's method, in numpy) ------------------------
def iqm(scores) -> float:
    """Interquartile mean: the mean of the middle 50% of the pooled scores (scipy's trim_mean(x, 0.25):
    int(0.25 n) scores cut from each end)."""
    x = np.sort(np.ravel(scores))
    cut = int(0.25 * x.size)
    return float(x[cut : x.size - cut].mean())


def stratified_bootstrap_ci(per_task: list[np.ndarray], reps: int = 2000, seed: int = 0) -> tuple[float, float]:
    """95% percentile interval of the IQM when each task's runs (seeds) are resampled with replacement
    within the task (Agarwal et al. 2021, rliable's StratifiedBootstrap). A fixed seed keeps the
    tables byte-identical from the same records."""
    rng = np.random.default_rng(seed)
    stats = [iqm(np.concatenate([s[rng.integers(0, s.size, s.size)] for s in per_task])) for _ in range(reps)]
    lo, hi = np.percentile(stats, [2.5, 97.5])
    return float(lo), float(hi)


def aggregate(records: list[dict], datasets) -> list[str]:
    """One row per algorithm (label): IQM of the last evaluation's per-seed scores over `datasets`,
    with its stratified-bootstrap interval; only algorithms with a record on every dataset."""
    by_label: dict[str, dict[str, np.ndarray]] = {}
    for r in records:
        if r["dataset"] in datasets:
            by_label.setdefault(label(r), {})[r["dataset"]] = seed_scores(r["evaluations"][-1])
    rows = []
    for name in sorted(by_label, key=lambda n: (not n.endswith("BC"), n)):
        tasks = by_label[name]
        if len(tasks) < len(datasets):
            rows.append(f"| {name} | {len(tasks)} of {len(datasets)} |  |  |")
            continue
        per_task = [tasks[d] for d in datasets]
        lo, hi = stratified_bootstrap_ci(per_task)
        rows.append(f"| {name} | {len(tasks)} of {len(datasets)} | {iqm(np.concatenate(per_task)):.1f} | "
                    f"[{lo:.1f}, {hi:.1f}] |")  # fmt: skip
    return rows


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


def aggregate_section(records: list[dict], tier: str) -> list[str]:
    """The aggregate table of one tier, as results/README.md and the top-level README show it."""
    import grid

    cells = grid.cells_of(tier, grid.CORE, list(grid.CELLS))
    in_grid = lambda r: any(grid.counts(r, c) for c in cells)  # noqa: E731
    return [
        f"## Aggregate, tier {tier}: IQM over the core grid's datasets",
        "",
        "Interquartile mean of the last evaluation's per-seed scores pooled over "
        f"{', '.join(f'`{d}`' for d in grid.CORE)}, with a 95% stratified-bootstrap interval (seeds resampled "
        "within each dataset, 2000 resamples; Agarwal et al. 2021). Only the grid's cells count (records made "
        "with a cell's file and flags, on the current build of the dataset, by code since the cell's last fix "
        '(results/findings.md, "Which code"): experiments such as RAVL on the '
        "true dynamics stay in the tables below), and only algorithms with a record on every one of these "
        "datasets get a number.",
        "",
        "| algorithm | datasets | IQM | 95% interval |",
        "|---|---|---|---|",
        *aggregate([r for r in records if r["tier"] == tier and grid.current(r) and in_grid(r)], grid.CORE),
        "",
    ]


def plot_dataset(records: list[dict], path: Path) -> None:
    """Every algorithm's learning curve (mean over seeds) on one dataset, online steps after the offline ones."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.6))
    for r in sorted(records, key=order):
        steps = np.array([e["step"] + (r["total_steps"] if e["phase"] == "online" else 0) for e in r["evaluations"]])
        ax.plot(steps, [seed_scores(e).mean() for e in r["evaluations"]], label=label(r), marker=".", markersize=3)
    ax.set_xlabel("updates (+ online env steps)")
    ax.set_ylabel("normalized score")
    ax.set_title(f"{records[0]['dataset']} ({records[0]['tier']} tier)", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def published() -> list[str]:
    """The separate table of published numbers (results/published.json), for context only."""
    if not PUBLISHED.exists():
        return []
    table = json.loads(PUBLISHED.read_text())
    lines = ["## Published D4RL numbers (context only, not comparable row for row)", "", table["note"],
             f"Source: {table['source']}.", "", "| D4RL dataset | " + " | ".join(table["columns"]) + " |",
             "|---|" + "---|" * len(table["columns"])]  # fmt: skip
    lines += [f"| {name} | " + " | ".join(values) + " |" for name, values in table["rows"].items()]
    return lines + [""]


def protocol(records: list[dict]) -> list[str]:
    """The grid (results/grid.py): its datasets and per-tier budgets, and the short tier's cells still missing."""
    import grid

    lines = [
        "## Protocol",
        "",
        "The core grid is every cell of `results/grid.py` (an algorithm file with a tier's flags) on "
        f"{', '.join(f'`{d}`' for d in grid.CORE)}. `python results/grid.py --tier short` runs the missing cells "
        "one at a time, resumably (`--max-minutes N` stops and the same command continues), and files each "
        "finished record here. Tiers never mix: `paper` is each paper's budget with 5 seeds, `short` the CPU "
        "budgets (an hour or less per cell on 2 idle cores).",
        "",
        "| cell | file and flags | short | paper |",
        "|---|---|---|---|",
    ]
    for name, (algo, own, budgets) in grid.CELLS.items():
        text = {}
        for tier in ("short", "paper"):
            b = budgets[tier]
            text[tier] = f"{b.total_steps:,} updates" + (f" + {b.online_steps:,} env steps" if b.online_steps else "")
            text[tier] += f" x {b.num_seeds} seeds" + (f", eval every {b.eval_every:,}" if b.eval_every else "")
            text[tier] += f", `{' '.join(b.flags)}`" if b.flags else ""
        lines.append(f"| {name} | `{' '.join([f'{algo}.py', *own])}` | {text['short']} | {text['paper']} |")
    cells = grid.cells_of("short", grid.CORE, list(grid.CELLS))
    done = {(c.dataset, c.name) for c in cells if grid.recorded(c, records)}
    old = {(c.dataset, c.name) for c in cells if any(grid.matches(r, c) and grid.current(r) for r in records)}
    lines += [
        "",
        f"Short tier, core grid: {len(done)} of {len(cells)} cells recorded on the current dataset builds "
        "(`done`); the others remain (`old`: recorded by code a later fix changed, to be run again; "
        'results/findings.md, "Which code").',
        "",
        "| dataset | " + " | ".join(grid.CELLS) + " |",
        "|---|" + "---|" * len(grid.CELLS),
    ]
    for dataset in grid.CORE:
        marks = ["done" if (dataset, name) in done else "old" if (dataset, name) in old else "-" for name in grid.CELLS]
        lines.append(f"| `{dataset}` | " + " | ".join(marks) + " |")
    return lines + [""]


ROLLOUT_COLUMNS = {
    "rollout/mean_length": "rollout length",
    "rollout/in_distribution_length": "steps in distribution",
    "filter/rejected_candidates": "candidates below threshold",
    "filter/rejected_transitions": "transitions below threshold",
    "filter/dynamics_reward": "r_D of the kept transitions",
}


def rollout_section(records: list[dict]) -> list[str]:
    """MOREC beside plain MOPO (--no-filter) on the same model: what the filter does to the rollouts,
    from each evaluation's `rollouts` entry (the mean over the rounds since the previous one)."""
    rows = [r for r in sorted(records, key=order)
            if r["algorithm"] == "morec" and any("rollouts" in e for e in r["evaluations"])]  # fmt: skip
    if not rows:
        return []
    lines = [
        "## MOREC's filter against plain MOPO: the rollouts",
        "",
        "Means over every evaluation's rollout rounds (seeds and rounds pooled). Rollout length: the steps a "
        "rollout keeps before a termination (MOREC also ends one where the kept transition's dynamics reward "
        "r_D falls below the threshold); steps in distribution: the steps before its first transition with r_D "
        "below the threshold (MOPO steps on past it); candidates below threshold: of the K candidates a step "
        "(MOPO: its one random sample); transitions below threshold: of those kept, the ones MOREC's filter "
        "ends a rollout on, or would have (MOPO).",
        "",
        "| algorithm | dataset | tier | seeds | last | " + " | ".join(ROLLOUT_COLUMNS.values()) + " |",
        "|---|---|---|---|---|" + "---|" * len(ROLLOUT_COLUMNS),
    ]
    for r in rows:
        rounds = [e["rollouts"] for e in r["evaluations"] if "rollouts" in e]
        cells = [
            f"{np.mean([x[c] for x in rounds]):.3f}" if all(c in x for x in rounds) else "" for c in ROLLOUT_COLUMNS
        ]
        lines.append(f"| {label(r)} | {r['dataset']} | {r['tier']} | {len(r['seeds'])} | "
                     f"{fmt(seed_scores(r['evaluations'][-1]))} | " + " | ".join(cells) + " |")  # fmt: skip
    return lines + [""]


def beta_section(records: list[dict]) -> list[str]:
    """FamO2O's balance model: the deterministic beta it picks on a fixed sample of dataset states, at
    the last offline and the last online evaluation (each evaluation's `beta` entry, per seed)."""
    rows = [r for r in sorted(records, key=order) if any("beta" in e for e in r["evaluations"])]
    if not rows:
        return []
    lines = [
        "## FamO2O's balance model: beta across dataset states",
        "",
        "The balance model's deterministic beta on the same dataset states at every evaluation: its mean and "
        "standard deviation over the states, and its 5th-95th percentiles, each averaged over seeds. A spread "
        "well above zero means it picks different balances for different states.",
        "",
        "| algorithm | dataset | seeds | beta range | phase (step) | mean over states | std over states "
        "| 5th-95th percentile |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        for phase in ("offline", "online"):
            entries = [e for e in r["evaluations"] if e["phase"] == phase and "beta" in e]
            if not entries:
                continue
            e, beta = entries[-1], entries[-1]["beta"]
            low, high = r.get("config", {}).get("beta_min"), r.get("config", {}).get("beta_max")
            lines.append(
                f"| {label(r)} | {r['dataset']} | {len(r['seeds'])} | {low}-{high} "
                f"| {phase} ({e['step']:,}) | {np.mean(beta['mean']):.2f} | {np.mean(beta['std']):.2f} "
                f"| {np.mean(beta['p5']):.2f}-{np.mean(beta['p95']):.2f} |"
            )
    return lines + [""]


def generate() -> str:
    records = load_all()
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
        lines += aggregate_section(rows, tier)
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
    lines += beta_section(records) + rollout_section(records) + protocol(records) + published()
    if FINDINGS.exists():  # prose explaining the numbers above; each number in it names its record
        lines += [FINDINGS.read_text().strip(), ""]
    PLOTS.mkdir(exist_ok=True)
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in records:
        groups.setdefault((r["dataset"], r["tier"]), []).append(r)
    for (dataset, tier), group in sorted(groups.items()):
        name = f"curves__{dataset.replace('/', '-')}__{tier}.png"
        plot_dataset(group, PLOTS / name)
        lines.append(f"![all algorithms on {dataset} ({tier})](plots/{name})")
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


AGGREGATE_START, AGGREGATE_END = "<!-- aggregate: generated by results/tables.py -->", "<!-- /aggregate -->"


def write() -> str:
    """Regenerate results/README.md and the plots, and the aggregate section of the top-level
    README (between its markers); files are replaced atomically. Returns results/README.md's text."""
    text = generate()
    atomic_text(HERE / "README.md", text)
    readme = HERE.parent / "README.md"
    top = readme.read_text()
    if AGGREGATE_START in top and AGGREGATE_END in top:
        records = load_all()
        section = [line for tier in ("paper", "short") if any(r["tier"] == tier for r in records)
                   for line in aggregate_section(records, tier)]  # fmt: skip
        section = [line.replace("## Aggregate", "### Aggregate") for line in section]
        head, rest = top.split(AGGREGATE_START, 1)
        tail = rest.split(AGGREGATE_END, 1)[1]
        atomic_text(readme, "\n".join([head + AGGREGATE_START, "", *section, AGGREGATE_END]) + tail)
    return text


def atomic_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.replace(path)


if __name__ == "__main__":
    sys.exit(main())
