"""The command line, the run directory and its contract: tensorboard scalars, progress bar,
checkpoints and the run record.

    runs/<algo>/<dataset id, / as ->__<YYYYmmdd-HHMMSS>-<pid>/
        config.json  events.out.tfevents.*  record.json  checkpoint.msgpack
        videos/step_<N>.mp4 (--capture-video)  wandb/ (--track)  eval_only/ (--eval-only)

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

Watching and loading a run:
- `--capture-video`: at each evaluation, episode 0 of the first seed as videos/step_<N>.mp4
  (online_step_<N>.mp4 in an online phase), and a thumbnail of it in tensorboard.
- `--track`: the same scalars, the config and the videos also go to Weights & Biases (the `track`
  extra; `WANDB_PROJECT` names the project, jaxorl by default; `WANDB_MODE=offline` works offline).
- `--eval-only RUN_DIR`: rebuild the run's evaluation policy from its config.json and checkpoint,
  evaluate it (`--eval-episodes`, `--seed` and `--capture-video` apply) and write the result to
  RUN_DIR/eval_only/; nothing else changes. `load_policy(RUN_DIR)` returns the same policy to code.

An algorithm file ends with `cli(Args, train)`; `train(args)` opens `RunLogger(algo, args, meta, ...)`
and, right after restoring a checkpoint, returns `logger.loaded(policy, params)` under `--eval-only`.
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
from common.evaluation import EvalResult, evaluate, headless_gl
from common.members import point_label, shard

CONFIG, RECORD, CHECKPOINT = "config.json", "record.json", "checkpoint.msgpack"
BUDGET_FLAGS = ("total_steps", "online_steps")  # may grow on --resume
LOGGING_FLAGS = ("no_log", "debug", "resume", "capture_video", "track", "eval_only")  # may change on --resume
EVAL_ONLY_FLAGS = ("eval_episodes", "seed", "capture_video", "no_log", "debug", "track")  # may differ on --eval-only


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
        if getattr(args, "capture_video", False):
            headless_gl()  # before MuJoCo is imported
        args = prepare(args_type, args, argv, validate)
        if args is not None:
            out = train(args)
            if getattr(args, "eval_only", None):
                report_eval_only(out, args)
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
    """The args a run starts from: the run's own config on `--resume` (None when it is finished)
    or `--eval-only`, checked flag by flag, with the output folder writable."""
    if getattr(args, "track", False):
        try:
            import wandb  # noqa: F401
        except ImportError:
            raise UserError("--track needs wandb: pip install -e '.[track]'") from None
    if getattr(args, "eval_only", None):
        if args.resume:
            raise UserError("--eval-only evaluates a run, --resume continues it: give one of them")
        args = eval_only_args(args_type, args, argv)
    elif getattr(args, "resume", None):
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


def read_run(run_dir: Path, what: str = "--resume") -> RunFiles:
    """A run directory's config, checkpoint and record, or one clear error saying what is wrong."""
    hint = f"give {what} the folder a run printed on its first line"
    if not run_dir.is_dir():
        raise UserError(f"{what} {run_dir}: no such folder; {hint}")
    missing = [n for n in (CONFIG, CHECKPOINT) if not (run_dir / n).exists()]
    if missing:
        raise UserError(f"{what} {run_dir}: not a run directory (no {' or '.join(missing)}); {hint}")
    try:
        config = json.loads((run_dir / CONFIG).read_text())
        assert isinstance(config, dict)
    except (ValueError, AssertionError, UnicodeDecodeError) as e:
        raise UserError(f"{what} {run_dir}: {CONFIG} is not a run config ({type(e).__name__})") from None
    try:
        raw = serialization.msgpack_restore((run_dir / CHECKPOINT).read_bytes())
        step, phase = int(raw["step"]), str(raw["phase"])
    except Exception as e:
        raise UserError(
            f"{what} {run_dir}: {CHECKPOINT} is truncated or corrupt ({type(e).__name__}); "
            f"it cannot be {'resumed, start a new run' if what == '--resume' else 'loaded'}"
        ) from None
    if "record" in raw:
        record = json.loads(raw["record"])
    else:  # checkpoints written before the record moved into them
        try:
            record = json.loads((run_dir / RECORD).read_text())
            assert isinstance(record, dict) and "evaluations" in record
        except (OSError, ValueError, AssertionError) as e:
            raise UserError(f"{what} {run_dir}: no readable run record ({type(e).__name__})") from None
    return RunFiles(config, record, step, phase, raw)


def eval_only_args(args_type: type, args: Any, argv: list[str]) -> Any:
    """`--eval-only RUN_DIR`: the run's own config, with the evaluation flags the command line
    gives (episodes, seed, video); any other flag that differs is refused. Its checkpoint is then
    restored as on `--resume`, and `train` returns the policy instead of training."""
    run_dir = Path(args.eval_only)
    run = read_run(run_dir, "--eval-only")
    algo = Path(command_name()).stem
    if run.record.get("algorithm") not in (None, algo) and algo in ALGORITHM_FILES:
        raise UserError(f"--eval-only {run_dir}: a {run.record['algorithm']} run, not {algo}: use its own file")
    fields = {f.name for f in dataclasses.fields(args_type)}
    given, values = given_flags(args_type, argv), {}
    for name in fields:
        ours = getattr(args, name)
        theirs = from_json(run.config[name]) if name in run.config else ours
        if name in ("capture_video", "no_log", "debug") or (name in given and name in EVAL_ONLY_FLAGS):
            values[name] = ours  # what this command asks for, never the run's video or logging choices
        elif name in given and name != "eval_only" and as_json(ours) != as_json(theirs):
            raise UserError(
                f"{flag(name)} {as_json(ours)} differs from the run's {as_json(theirs)}: --eval-only takes the run's "
                f"config and changes only {', '.join(flag(n) for n in EVAL_ONLY_FLAGS[:3])}"
            )
        else:
            values[name] = theirs
    values.update(eval_only=str(run_dir), resume=str(run_dir), track=False)
    return args_type(**{k: v for k, v in values.items() if k in fields})


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


MACHINE_FLAGS = ("out_dir", "resume", "eval_only")  # paths of the machine that ran it: kept out of records


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


def first_nonfinite(metrics: dict, step0: int, seeds: list) -> str | None:
    """Describe the earliest non-finite metrics of a chunk (arrays shaped (members, steps) whose
    step i is update step0 + i + 1), naming the seed (a member's label in a sweep), the step and
    every loss that is not finite."""
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

    def __init__(
        self, algo: str, args: Any, meta: Meta, *, seeds: list[int], paper_steps: tuple[int, int], points=None
    ):
        """`points`: the --sweep grid (common.members.sweep_points); members are points x seeds."""
        config = dataclasses.asdict(args)
        self.points = points if points and points[0] else None
        # The record travels (results/records/): no path of this machine in it. config.json keeps them.
        portable = {k: v for k, v in config.items() if k not in MACHINE_FLAGS}
        total_steps, online_steps = args.total_steps, getattr(args, "online_steps", 0)
        self.paper_steps, self.meta, self.args = paper_steps, meta, args
        self.resumed: RunFiles | None = None
        self.writer = self.wandb = self.bar = None
        self.videos = bool(getattr(args, "capture_video", False))
        if getattr(args, "eval_only", None):  # read the run, write nothing: `loaded` follows
            self.run_dir = Path(args.eval_only)
            self.resumed = read_run(self.run_dir, "--eval-only")
            self.record = self.resumed.record
            self.checkpoint_config = dict(self.record.get("config") or self.resumed.config)
            self.check_fingerprint(meta)
            return
        if getattr(args, "resume", None):
            self.run_dir = Path(args.resume)
            self.resumed = read_run(self.run_dir)
            self.record = self.resumed.record
            self.check_fingerprint(meta)
            # The flags the checkpoint was trained under (config.json already holds the new budget
            # after a resume that was killed before its first checkpoint).
            self.checkpoint_config = dict(self.record.get("config") or self.resumed.config)
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
                **({"sweep": {"points": self.points}} if self.points else {}),
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
        if not getattr(args, "no_log", False):
            from tensorboard.summary import Writer

            self.writer = Writer(str(self.run_dir))
        if getattr(args, "track", False):
            self.wandb = start_wandb(self.run_dir, algo, meta.dataset_id, config)

    def check_fingerprint(self, meta: Meta) -> None:
        if self.record["dataset_fingerprint"] != meta.fingerprint:
            raise UserError(
                f"{meta.dataset_id} now has fingerprint {meta.fingerprint[:12]}..., but the run trained on "
                f"{self.record['dataset_fingerprint'][:12]}...: the dataset was rebuilt or changed, so the run "
                "cannot continue on it"
            )

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
        if self.writer is not None:
            for tag, v in values.items():
                self.writer.add_scalar(tag, float(v), step)
        if self.wandb is not None:  # its own step axis: online steps restart at 0 as in tensorboard
            self.wandb.log({**{tag: float(v) for tag, v in values.items()}, "global_step": int(step)})

    def video(self, step: int, phase: str = "offline") -> Path | None:
        """Where this evaluation's video goes (--capture-video), else None."""
        if not self.videos:
            return None
        return self.run_dir / "videos" / f"{'online_' if phase == 'online' else ''}step_{step}.mp4"

    def metrics(self, step: int, metrics: dict) -> None:
        """Chunk metrics shaped (num_seeds, steps): log the chunk mean over steps and seeds."""
        self.scalars(step, {f"train/{k}": np.mean(np.asarray(v)) for k, v in metrics.items()})

    # --- evaluations and the record ---
    def note(self, text: str) -> None:
        """One line a reader of this run must know (e.g. a resumed budget that changed a schedule):
        printed, and kept in the record's "notes" (written with the next checkpoint)."""
        print(f"note: {text}", flush=True)
        notes = self.record.setdefault("notes", [])
        if text not in notes:
            notes.append(text)

    def evaluation(self, step: int, result: EvalResult, phase: str = "offline", extra: dict | None = None) -> dict:
        """Add an evaluation to the record (in memory: `save_checkpoint` writes it to disk); `extra`
        holds an algorithm's own JSON-ready diagnostics for this entry (e.g. FamO2O's beta spread)."""
        per_seed = result.normalized.mean(1)
        entry = {**eval_entry(step, phase, result), **(extra or {})}
        tb = {"eval/normalized/mean": per_seed.mean(), "eval/return/mean": result.returns.mean()}
        if result.success is not None:
            tb["eval/success_rate"] = result.success.mean()
        seeds = self.record["seeds"]
        for i, value in enumerate(per_seed):
            point = f"{point_label(self.points[i // len(seeds)])}/" if self.points else ""
            tb[f"eval/normalized/{point}seed_{seeds[i % len(seeds)]}"] = value
        self.scalars(step, tb)
        if result.video:
            self.log_video(step, result)
        if self.writer is not None:
            self.writer.flush()
        self.record["evaluations"].append(entry)
        self.record["final"] = summarize(entry)
        if self.points:  # one summary per grid point: its seeds' rows
            n = len(self.record["seeds"])
            self.record["final_per_point"] = [
                {"point": point, **summarize(entry, slice(g * n, (g + 1) * n))} for g, point in enumerate(self.points)
            ]
        if phase == "offline":
            self.record["final_offline"] = self.record["final"]
        if self.bar is not None:
            self.bar.set_postfix(score=f"{per_seed.mean():.1f}", refresh=True)
        return self.record["final"]

    def log_video(self, step: int, result: EvalResult) -> None:
        """An animated thumbnail in tensorboard (the MP4 stays in videos/), the MP4 in wandb."""
        if self.writer is not None and result.thumbnail:
            from tensorboard.compat.proto import event_pb2, summary_pb2

            frames = result.thumbnail
            image = summary_pb2.Summary.Image(height=frames[0].shape[0], width=frames[0].shape[1], colorspace=3,
                                              encoded_image_string=gif_bytes(frames))  # fmt: skip
            event = event_pb2.Event(wall_time=time.time(), step=int(step))
            event.summary.value.add(tag="eval/video", image=image)
            self.writer._output._ev_writer.add_event(event)  # the numpy-only Writer has no add_image
        if self.wandb is not None:
            import wandb

            self.wandb.log({"eval/video": wandb.Video(result.video, format="mp4"), "global_step": int(step)})

    def loaded(self, policy, params: Any, carry: Any = None) -> LoadedPolicy:
        """Under --eval-only, what `train` returns right after restoring the checkpoint."""
        return LoadedPolicy(
            self.meta, policy, params, carry, self.run_dir, self.resumed.step, self.resumed.phase,
            self.record, self.args.eval_episodes, self.args.seed,
        )  # fmt: skip

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
        if online_template is not None and online is not None:
            online = shard(online)
        # members spread over the devices again, as a fresh run places them
        return Checkpoint(shard(state), self.resumed.step, shard(rng), self.resumed.phase, online, host)

    def close(self, finished: bool = True) -> dict:
        """Close the logs; `finished` marks a run that reached its budget."""
        if self.bar is not None:
            self.bar.close()
        if self.writer is not None:
            self.writer.close()
        if self.wandb is not None:
            self.wandb.summary.update({"finished": finished, **self.record.get("final", {})})
            self.wandb.finish()
        self.record["wall_time_s"] = round(time.time() - self._wall0, 1)
        self.record["finished"] = finished
        for point in self.record.get("final_per_point", []) if finished else []:
            print(f"  {point_label(point['point'])}: {point['normalized_mean']:.1f} ± {point['normalized_std']:.1f}")
        atomic_write(self.run_dir / RECORD, json.dumps(self.record, indent=1))
        return self.record


def eval_entry(step: int, phase: str, result: EvalResult) -> dict:
    """One evaluation as the record keeps it."""
    entry = {
        "step": int(step),
        "phase": phase,
        "returns": np.round(result.returns, 3).tolist(),
        "normalized": np.round(result.normalized, 3).tolist(),
        "lengths": result.lengths.tolist(),
        "eval_seconds": round(result.seconds, 2),  # the first evaluation includes compilation
        "episodes_per_s": round(result.lengths.size / max(result.seconds, 1e-9), 2),
        "env_steps_per_s": round(float(result.lengths.sum()) / max(result.seconds, 1e-9), 1),
    }
    if result.success is not None:
        entry["success"] = result.success.astype(int).tolist()
    return entry


def gif_bytes(frames: list) -> bytes:
    import io

    from PIL import Image

    images = [Image.fromarray(np.asarray(f, np.uint8)) for f in frames]
    out = io.BytesIO()
    images[0].save(out, format="GIF", save_all=True, append_images=images[1:], duration=80, loop=0)
    return out.getvalue()


def start_wandb(run_dir: Path, algo: str, dataset: str, config: dict):
    """A wandb run for this run directory, continued (same id) when the run is resumed."""
    import wandb

    run = wandb.init(
        project=os.environ.get("WANDB_PROJECT", "jaxorl"), id=run_dir.name.replace(":", "-")[:64],
        name=run_dir.name, resume="allow", dir=str(run_dir), group=f"{algo}/{dataset}",
        config={k: v for k, v in as_json(config).items() if k not in MACHINE_FLAGS}, tags=[algo],
    )  # fmt: skip
    run.define_metric("global_step")
    run.define_metric("*", step_metric="global_step")
    return run


class LoadedPolicy(NamedTuple):
    """A trained run's evaluation policy, rebuilt from its config.json and checkpoint:
    `policy(params, carry, obs, prev_reward, rng)` as `common.evaluation.evaluate` calls it, with obs
    shaped (num_seeds, episodes, obs_dim) and params stacked over the run's seeds."""

    meta: Meta
    policy: Any
    params: Any
    carry: Any
    run_dir: Path
    step: int  # of the checkpoint
    phase: str  # "offline" or "online"
    record: dict
    eval_episodes: int
    seed: int

    def evaluate(self, num_episodes: int | None = None, seed: int | None = None, video=None) -> EvalResult:
        """Evaluate as the run did (its episodes and seed unless given); `video=PATH` renders one."""
        n = self.eval_episodes if num_episodes is None else num_episodes
        return evaluate(self.meta, self.policy, self.params, num_episodes=n,
                        seed=self.seed if seed is None else seed, carry=self.carry, video=video)  # fmt: skip


def load_policy(run_dir: str | Path, **flags) -> LoadedPolicy:
    """The evaluation policy of a run directory, for code: `load_policy("runs/iql/...").evaluate()`.
    Imports the run's algorithm file from this repository and restores its checkpoint; `flags` are
    the evaluation flags --eval-only takes (eval_episodes, seed)."""
    import importlib.util

    run = read_run(Path(run_dir), "load_policy")
    algo = run.record.get("algorithm")
    path = REPO_ROOT / "algorithms" / f"{algo}.py"
    if algo not in ALGORITHM_FILES or not path.exists():
        raise UserError(f"load_policy {run_dir}: no algorithm file for a {algo!r} run at {path}")
    name = f"jaxorl_algorithms_{algo}"
    module = sys.modules.get(name)
    if module is None:
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # dataclasses resolve their module by name
        spec.loader.exec_module(module)
    argv = ["--eval-only", str(run_dir)] + [flag(k) for k in flags]
    args = module.Args(eval_only=str(run_dir), **flags)
    args = prepare(module.Args, args, argv, getattr(module, "validate", None))
    return module.train(args)


def report_eval_only(loaded: LoadedPolicy, args: Any) -> dict:
    """`--eval-only`: evaluate, print one line beside the record's last evaluation, and write the
    evaluation to RUN_DIR/eval_only/ (the MP4 beside it with --capture-video)."""
    if not isinstance(loaded, LoadedPolicy):
        raise TypeError("--eval-only: this algorithm file's train() did not return its policy")
    out = loaded.run_dir / "eval_only"
    phase = "online_" if loaded.phase == "online" else ""
    stem = f"{phase}step_{loaded.step}__seed_{args.seed}__{args.eval_episodes}ep"
    video = out / f"{stem}.mp4" if args.capture_video else None
    result = loaded.evaluate(args.eval_episodes, args.seed, video=video)
    entry = eval_entry(loaded.step, loaded.phase, result)
    out.mkdir(exist_ok=True)
    atomic_write(out / f"{stem}.json", json.dumps(entry, indent=1))
    summary = summarize(entry)
    last = loaded.record["evaluations"][-1] if loaded.record.get("evaluations") else None
    before = f"; the record's last evaluation: {summarize(last)['normalized_mean']:.1f}" if last else ""
    print(f"{loaded.run_dir} ({loaded.phase} step {loaded.step}): normalized {summary['normalized_mean']:.1f} ± "
          f"{summary['normalized_std']:.1f} over {args.eval_episodes} episodes x {len(summary['per_seed'])} "
          f"{'members' if 'sweep' in loaded.record else 'seeds'} "
          f"(reset seed {args.seed}){before}; written to {out / (stem + '.json')}", flush=True)  # fmt: skip
    return entry


def summarize(entry: dict, rows: slice = slice(None)) -> dict:
    """Mean and std over seeds (members; `rows` picks a sweep point's) of the per-seed mean score."""
    per_seed = np.asarray(entry["normalized"])[rows].mean(1)
    out = {
        "step": entry["step"],
        "normalized_mean": round(float(per_seed.mean()), 3),
        "normalized_std": round(float(per_seed.std()), 3),
        "per_seed": np.round(per_seed, 3).tolist(),
    }
    if "success" in entry:
        out["success_rate"] = round(float(np.mean(np.asarray(entry["success"])[rows])), 3)
    return out
