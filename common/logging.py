"""The command line, the run directory and its contract: tensorboard scalars, progress bar,
checkpoints and the run record.

    runs/<algo>/<dataset id, / as ->__<YYYYmmdd-HHMMSS>-<pid>/
        config.json  events.out.tfevents.*  record.json  checkpoint.msgpack

A run directory is a contract:
- `--resume RUN_DIR` alone continues the run from its own config.json. Flags given with it may only
  extend the budget (`--total-steps`, `--online-steps`) or change logging (`--no-log`, `--debug`);
  any other flag that differs from the run's value is refused before anything loads, and the
  dataset must still have the run's fingerprint. A finished run resumed without a larger budget
  says so and changes nothing.
- checkpoint.msgpack holds everything the next step depends on (parameters, optimizer states,
  step, RNG, an online phase's buffer and environment actions) and the record itself. It is
  written first and record.json after it, so a kill between the two can neither lose nor
  duplicate an evaluation: a resumed run takes its record from the checkpoint.
- Every file is written atomically (temp file + rename).
- Bad input (flags, ids, data, paths): one line on stderr, exit code 1 (2 for flags tyro rejects),
  no traceback (`--debug` shows it), and no run folder for a run that never started.

An algorithm file ends with `cli(Args, train)`; `train(args)` opens `RunLogger(algo, args, meta, ...)`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, NamedTuple

import jax
import numpy as np
from flax import serialization
from tqdm.auto import tqdm

from common.data import REPO_ROOT, Meta, UserError
from common.evaluation import EvalResult

CONFIG, RECORD, CHECKPOINT = "config.json", "record.json", "checkpoint.msgpack"
BUDGET_FLAGS = ("total_steps", "online_steps")  # may grow on --resume
LOGGING_FLAGS = ("no_log", "debug", "resume")  # may change on --resume


def atomic_write(path: Path, data: bytes | str) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_bytes(data.encode() if isinstance(data, str) else data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


# --- The command line -------------------------------------------------------------------------
def cli(args_type: type, train, validate=None) -> None:
    """Entry point of every algorithm file: parse (tyro), resolve `--resume`, validate, train.

    Errors end the process with one line on stderr and exit code 1; `--debug` re-raises them."""
    argv = sys.argv[1:]
    import tyro

    args = tyro.cli(args_type, args=argv)
    try:
        args = prepare(args_type, args, argv, validate)
        if args is not None:
            train(args)
    except KeyboardInterrupt:
        print("interrupted; the last checkpoint (if any) is in the run directory", file=sys.stderr)
        sys.exit(130)
    except Exception as e:
        if getattr(args, "debug", False):
            raise
        print(f"error: {describe(e)}", file=sys.stderr, flush=True)
        sys.exit(1)


def describe(e: BaseException) -> str:
    """One line for an error: the message of expected errors, the type and first line otherwise."""
    expected = (UserError, OSError, ValueError, TypeError, FloatingPointError, ImportError)
    text = " ".join(str(e).split()) if isinstance(e, UserError) else (str(e).strip().splitlines() or [""])[0]
    if isinstance(e, expected):
        return text or type(e).__name__
    return f"{type(e).__name__}: {text} (unexpected: run again with --debug for the traceback)"


def prepare(args_type: type, args: Any, argv: list[str], validate=None) -> Any | None:
    """The args a run starts from: the run's own config on `--resume` (None when it is finished),
    checked flag by flag, with the output folder writable."""
    if getattr(args, "resume", None):
        args = resume_args(args_type, args, argv)
        if args is None:
            return None
    check_args(args)
    if validate is not None:
        validate(args)
    check_writable(Path(args.resume) if getattr(args, "resume", None) else Path(args.out_dir), "--out-dir")
    return args


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def check_args(args: Any) -> None:
    """The flag vocabulary every file shares, checked before anything loads."""

    def get(name):
        return getattr(args, name, None)

    for name in ("num_seeds", "batch_size", "eval_every", "eval_episodes"):
        if get(name) is not None and get(name) < 1:
            raise UserError(f"{flag(name)} must be at least 1, got {get(name)}")
    for name in ("total_steps", "online_steps", "seed"):
        if get(name) is not None and get(name) < 0:
            raise UserError(f"{flag(name)} must be 0 or more, got {get(name)}")
    if (get("total_steps") or 0) + (get("online_steps") or 0) == 0:
        raise UserError("--total-steps (and --online-steps) are 0: nothing to train")
    for f in dataclasses.fields(args):
        value = get(f.name)
        if f.name.endswith("hidden_dims") and value is not None:
            if len(value) == 0:
                raise UserError(f"{flag(f.name)} needs at least one layer size, e.g. {flag(f.name)} 256 256")
            if min(value) < 1:
                raise UserError(f"{flag(f.name)} sizes must be positive, got {' '.join(map(str, value))}")


def check_writable(path: Path, what: str) -> None:
    """`path` exists as a writable folder or can be created: else one clear error."""
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if existing.exists() and not existing.is_dir():
        raise UserError(f"{what} {path}: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"{what} {path}: {existing} is not writable; choose a folder you can write to")


def given_flags(args_type: type, argv: list[str]) -> set[str]:
    """Fields the command line names explicitly (`--flag`, `--flag=v`, tyro's `--no-flag`)."""
    names = {f.name for f in dataclasses.fields(args_type)}
    given = set()
    for token in argv:
        if token.startswith("--"):
            name = token[2:].split("=", 1)[0].replace("-", "_")
            if name in names:
                given.add(name)
            elif name.startswith("no_") and name[3:] in names:
                given.add(name[3:])
    return given


def from_json(value):
    return tuple(value) if isinstance(value, list) else value


def as_json(value):
    return json.loads(json.dumps(value, default=str))


class RunFiles(NamedTuple):
    config: dict
    record: dict
    step: int
    phase: str
    raw: dict  # the checkpoint, as msgpack restored it


def read_run(run_dir: Path) -> RunFiles:
    """A run directory's config, checkpoint and record, or one clear error saying what is wrong."""
    hint = "give --resume the folder a run printed on its first line"
    if not run_dir.is_dir():
        raise UserError(f"--resume {run_dir}: no such folder; {hint}")
    missing = [n for n in (CONFIG, CHECKPOINT) if not (run_dir / n).exists()]
    if missing:
        raise UserError(f"--resume {run_dir}: not a run directory (no {' or '.join(missing)}); {hint}")
    try:
        config = json.loads((run_dir / CONFIG).read_text())
        assert isinstance(config, dict)
    except (ValueError, AssertionError, UnicodeDecodeError) as e:
        raise UserError(f"--resume {run_dir}: {CONFIG} is not a run config ({type(e).__name__})") from None
    try:
        raw = serialization.msgpack_restore((run_dir / CHECKPOINT).read_bytes())
        step, phase = int(raw["step"]), str(raw["phase"])
    except Exception as e:
        raise UserError(
            f"--resume {run_dir}: {CHECKPOINT} is truncated or corrupt ({type(e).__name__}); "
            "it cannot be resumed, start a new run"
        ) from None
    if "record" in raw:
        record = json.loads(raw["record"])
    else:  # checkpoints written before the record moved into them
        try:
            record = json.loads((run_dir / RECORD).read_text())
            assert isinstance(record, dict) and "evaluations" in record
        except (OSError, ValueError, AssertionError) as e:
            raise UserError(f"--resume {run_dir}: no readable run record ({type(e).__name__})") from None
    return RunFiles(config, record, step, phase, raw)


def resume_args(args_type: type, args: Any, argv: list[str]) -> Any | None:
    """The run's own config, with the budget and logging flags the command line gives; any other
    flag that differs is refused. None (after saying so) if the run is finished."""
    run_dir = Path(args.resume)
    run = read_run(run_dir)
    algo = Path(command_name()).stem
    if run.record.get("algorithm") not in (None, algo) and algo in ALGORITHM_FILES:
        raise UserError(f"--resume {run_dir}: a {run.record['algorithm']} run, not {algo}: resume it with its own file")
    fields = {f.name: f for f in dataclasses.fields(args_type)}
    unknown = sorted(set(run.config) - set(fields))
    if unknown:
        raise UserError(f"--resume {run_dir}: its {CONFIG} has flags this file does not know ({', '.join(unknown)})")
    given, values = given_flags(args_type, argv), {}
    for name in fields:
        ours = getattr(args, name)
        theirs = from_json(run.config[name]) if name in run.config else ours
        if name in LOGGING_FLAGS or name not in given:
            values[name] = ours if name in LOGGING_FLAGS else theirs
        elif name in BUDGET_FLAGS:
            if ours < theirs:
                raise UserError(f"{flag(name)} {ours} is below the run's {theirs}: a resumed run can only extend it")
            values[name] = ours
        elif as_json(ours) != as_json(theirs):
            raise UserError(
                f"{flag(name)} {as_json(ours)} differs from the run's {as_json(theirs)} ({run_dir / CONFIG}); "
                "a resumed run keeps its config: drop the flag, or start a new run"
            )
        else:
            values[name] = theirs
    new = args_type(**values)
    online = getattr(new, "online_steps", 0)
    if run.phase == "online" and new.total_steps > run.config.get("total_steps", 0):
        raise UserError(f"--total-steps: the run is past its offline phase ({run.config['total_steps']} updates)")
    finished = run.step >= online if run.phase == "online" else (run.step >= new.total_steps and online == 0)
    if finished:
        done = f"{run.step} online steps" if run.phase == "online" else f"{run.step} updates"
        more = "--total-steps or --online-steps" if hasattr(new, "online_steps") else "--total-steps"
        print(f"{run_dir}: the run is finished ({done}) and nothing was changed; give a larger {more} to continue it")
        return None
    return new


ALGORITHM_FILES = ("iql", "cql", "cal_ql", "famo2o", "morec", "ravl", "dt", "reinflow", "bc")


# --- The run record ---------------------------------------------------------------------------
def git_state() -> tuple[str, bool]:
    """(commit, dirty): dirty if the code a run executes (common/, datasets/ and the running
    algorithm file) differs from that commit."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=5
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "common", "datasets", command_name()],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=5,
        ).stdout.strip()
        return commit or "unknown", bool(dirty)
    except (OSError, subprocess.SubprocessError):
        return "unknown", True


def command_name() -> str:
    """argv[0] relative to the repo (e.g. algorithms/iql.py) when it lives there."""
    path = Path(sys.argv[0]).resolve()
    try:
        return path.relative_to(REPO_ROOT).as_posix()
    except ValueError:
        return sys.argv[0]


MACHINE_FLAGS = ("out_dir", "resume")  # paths of the machine that ran it: kept out of records


def portable_flags(argv: list[str]) -> list[str]:
    """The flags as a user would retype them: without --out-dir (where this machine kept its runs,
    often an absolute path), which does not change what a run computes."""
    out, skip = [], False
    for flag in argv:
        if skip:
            skip = False
        elif flag in ("--out-dir", "--out_dir"):
            skip = True
        elif not flag.startswith(("--out-dir=", "--out_dir=")):
            out.append(flag)
    return out


def device_name() -> str:
    dev = jax.devices()[0]
    return "cpu" if dev.platform == "cpu" else dev.device_kind


def tier_of(total_steps: int, online_steps: int, paper_steps: tuple[int, int]) -> str:
    """ "paper" only when EACH phase reaches the paper's budget, else "short"."""
    return "paper" if total_steps >= paper_steps[0] and online_steps >= paper_steps[1] else "short"


def first_nonfinite(metrics: dict, step0: int, seeds: list[int]) -> str | None:
    """Describe the earliest non-finite metrics of a chunk (arrays shaped (num_seeds, steps) whose
    step i is update step0 + i + 1), naming the seed, the step and every loss that is not finite."""
    arrays = {k: np.asarray(v).reshape(len(seeds), -1) for k, v in metrics.items()}
    bad = {k: ~np.isfinite(v) for k, v in arrays.items()}
    first = [(np.argwhere(b.any(0))[0, 0], k) for k, b in bad.items() if b.any()]
    if not first:
        return None
    i = min(first)[0]
    s = next(s for s in range(len(seeds)) if any(b[s, i] for b in bad.values()))
    losses = ", ".join(f"{k}={arrays[k][s, i]}" for k in arrays if bad[k][s, i])
    return f"seed {seeds[s]}, step {step0 + i + 1}: {losses}"


class Checkpoint(NamedTuple):
    state: Any
    step: int
    rng: jax.Array
    phase: str  # "offline" or "online"
    online: Any  # the online phase's device arrays (e.g. its replay buffer), or None
    host: dict  # the online phase's host-side arrays (e.g. every environment action), or {}


class RunLogger:
    """Owns one run directory: a new one, or the `args.resume` one (after `prepare` checked it)."""

    def __init__(self, algo: str, args: Any, meta: Meta, *, seeds: list[int], paper_steps: tuple[int, int]):
        config = dataclasses.asdict(args)
        # The record travels (results/records/): no path of this machine in it. config.json keeps them.
        portable = {k: v for k, v in config.items() if k not in MACHINE_FLAGS}
        total_steps, online_steps = args.total_steps, getattr(args, "online_steps", 0)
        self.paper_steps = paper_steps
        self.resumed: RunFiles | None = None
        if getattr(args, "resume", None):
            self.run_dir = Path(args.resume)
            self.resumed = read_run(self.run_dir)
            self.record = self.resumed.record
            if self.record["dataset_fingerprint"] != meta.fingerprint:
                raise UserError(
                    f"{meta.dataset_id} now has fingerprint {meta.fingerprint[:12]}..., but the run trained on "
                    f"{self.record['dataset_fingerprint'][:12]}...: the dataset was rebuilt or changed, so the run "
                    "cannot continue on it"
                )
            self.record.update(config=portable, total_steps=total_steps, online_steps=online_steps, finished=False)
            self.record["tier"] = tier_of(total_steps, online_steps, paper_steps)
        else:
            stamp = time.strftime("%Y%m%d-%H%M%S")
            name = f"{meta.dataset_id.replace('/', '-')}__{stamp}-{os.getpid()}"
            self.run_dir = Path(args.out_dir) / algo / name
            commit, dirty = git_state()
            self.record = {
                "algorithm": algo,
                "dataset": meta.dataset_id,
                "config": portable,
                "command": [command_name()] + portable_flags(sys.argv[1:]),
                "commit": commit,
                "dirty": dirty,
                "jax_version": jax.__version__,
                "device": device_name(),
                "tier": tier_of(total_steps, online_steps, paper_steps),
                "dataset_size": meta.size,
                "dataset_fingerprint": meta.fingerprint,
                "seeds": seeds,
                "num_seeds": len(seeds),
                "total_steps": total_steps,
                "online_steps": online_steps,
                "wall_time_s": 0.0,
                "finished": False,
                "evaluations": [],
            }
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            atomic_write(self.run_dir / CONFIG, json.dumps(config, indent=2, default=str))
        except OSError as e:
            raise UserError(f"cannot write the run directory {self.run_dir}: {e.strerror or e}") from None
        print(f"run directory: {self.run_dir}", flush=True)
        self._wall0 = time.time() - self.record["wall_time_s"]
        self.writer = None
        if not getattr(args, "no_log", False):
            from tensorboard.summary import Writer

            self.writer = Writer(str(self.run_dir))
        self.bar = None

    # --- progress and scalars ---
    def progress(self, total: int, initial: int = 0, desc: str = "train") -> None:
        if self.bar is not None:
            self.bar.close()
        self.bar = tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True, mininterval=2.0)

    def advance(self, n: int, **postfix) -> None:
        if self.bar is not None:
            self.bar.update(n)
            if postfix:
                self.bar.set_postfix({k: f"{v:.3g}" for k, v in postfix.items()}, refresh=False)

    def scalars(self, step: int, values: dict) -> None:
        if self.writer is None:
            return
        for tag, v in values.items():
            self.writer.add_scalar(tag, float(v), step)

    def metrics(self, step: int, metrics: dict) -> None:
        """Chunk metrics shaped (num_seeds, steps): log the chunk mean over steps and seeds."""
        self.scalars(step, {f"train/{k}": np.mean(np.asarray(v)) for k, v in metrics.items()})

    # --- evaluations and the record ---
    def evaluation(self, step: int, result: EvalResult, phase: str = "offline", extra: dict | None = None) -> dict:
        """Add an evaluation to the record (in memory: `save_checkpoint` writes it to disk); `extra`
        holds an algorithm's own JSON-ready diagnostics for this entry (e.g. FamO2O's beta spread)."""
        per_seed = result.normalized.mean(1)
        entry = {
            "step": int(step),
            "phase": phase,
            "returns": np.round(result.returns, 3).tolist(),
            "normalized": np.round(result.normalized, 3).tolist(),
            "lengths": result.lengths.tolist(),
            "eval_seconds": round(result.seconds, 2),  # the first evaluation includes compilation
            "episodes_per_s": round(result.lengths.size / max(result.seconds, 1e-9), 2),
            "env_steps_per_s": round(float(result.lengths.sum()) / max(result.seconds, 1e-9), 1),
            **(extra or {}),
        }
        tb = {"eval/normalized/mean": per_seed.mean(), "eval/return/mean": result.returns.mean()}
        if result.success is not None:
            entry["success"] = result.success.astype(int).tolist()
            tb["eval/success_rate"] = result.success.mean()
        for i, seed in enumerate(self.record["seeds"]):
            tb[f"eval/normalized/seed_{seed}"] = per_seed[i]
        self.scalars(step, tb)
        if self.writer is not None:
            self.writer.flush()
        self.record["evaluations"].append(entry)
        self.record["final"] = summarize(entry)
        if phase == "offline":
            self.record["final_offline"] = self.record["final"]
        if self.bar is not None:
            self.bar.set_postfix(score=f"{per_seed.mean():.1f}", refresh=True)
        return self.record["final"]

    def stop_nonfinite(self, bad: str, where: str = "") -> None:
        """Raise the error of a non-finite loss, naming the checkpoint that is left (if any)."""
        ckpt = self.run_dir / CHECKPOINT
        self.close(finished=False)
        left = f"the last finite checkpoint is {ckpt}" if ckpt.exists() else "no checkpoint was written before it"
        raise FloatingPointError(f"non-finite loss{where}, training stopped at {bad}; {left}")

    # --- checkpoints ---
    def save_checkpoint(
        self, state: Any, step: int, rng: jax.Array, phase: str = "offline", online: Any = None, host: dict = None
    ) -> None:
        """Checkpoint (with the record inside), then record.json: a kill between the two loses nothing."""
        self.record["wall_time_s"] = round(time.time() - self._wall0, 1)
        payload = {
            "state": serialization.to_state_dict(jax.device_get(state)),
            "step": int(step),
            "rng": np.asarray(jax.random.key_data(rng)),
            "phase": phase,
            "record": json.dumps(self.record),
            "online": {} if online is None else serialization.to_state_dict(jax.device_get(online)),
            "host": host or {},
        }
        atomic_write(self.run_dir / CHECKPOINT, serialization.msgpack_serialize(payload))
        atomic_write(self.run_dir / RECORD, json.dumps(self.record, indent=1))

    def load_checkpoint(self, state_template: Any, rng_template: jax.Array, online_template: Any = None) -> Checkpoint:
        """The resumed run's checkpoint, shaped like the templates (the state of a fresh init)."""
        raw = self.resumed.raw
        try:
            state = serialization.from_state_dict(state_template, raw["state"])
            online = raw.get("online") or None  # as saved (nested dicts of arrays) without a template
            if online_template is not None and online is not None:
                online = serialization.from_state_dict(online_template, online)
            rng = jax.random.wrap_key_data(np.asarray(raw["rng"]).reshape(jax.random.key_data(rng_template).shape))
            same = jax.tree_util.tree_map(lambda a, b: np.shape(a) == np.shape(b), state_template, state)
            if not all(jax.tree_util.tree_leaves(same)):
                raise ValueError("array shapes differ")
        except (ValueError, KeyError, TypeError) as e:
            raise UserError(f"{self.run_dir / CHECKPOINT} does not fit this run's networks ({e})") from None
        host = {k: np.array(v) for k, v in raw.get("host", {}).items()}  # writable copies
        return Checkpoint(state, self.resumed.step, rng, self.resumed.phase, online, host)

    def close(self, finished: bool = True) -> dict:
        """Close the logs; `finished` marks a run that reached its budget."""
        if self.bar is not None:
            self.bar.close()
        if self.writer is not None:
            self.writer.close()
        self.record["wall_time_s"] = round(time.time() - self._wall0, 1)
        self.record["finished"] = finished
        atomic_write(self.run_dir / RECORD, json.dumps(self.record, indent=1))
        return self.record


def summarize(entry: dict) -> dict:
    per_seed = np.asarray(entry["normalized"]).mean(1)
    out = {
        "step": entry["step"],
        "normalized_mean": round(float(per_seed.mean()), 3),
        "normalized_std": round(float(per_seed.std()), 3),
        "per_seed": np.round(per_seed, 3).tolist(),
    }
    if "success" in entry:
        out["success_rate"] = round(float(np.mean(entry["success"])), 3)
    return out
