"""Run directory, tensorboard scalars, progress bar, checkpoints and the run record.

    runs/<algo>/<dataset id, / as ->__<YYYYmmdd-HHMMSS>-<pid>/
        config.json  events.out.tfevents.*  record.json  checkpoint.msgpack

Every file is written atomically (temp file + rename), so a crash never leaves half a record or
checkpoint behind.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import serialization
from tqdm.auto import tqdm

from common.data import REPO_ROOT, Meta
from common.evaluation import EvalResult


def atomic_write(path: Path, data: bytes | str) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data.encode() if isinstance(data, str) else data)
    os.replace(tmp, path)


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


def device_name() -> str:
    dev = jax.devices()[0]
    return "cpu" if dev.platform == "cpu" else dev.device_kind


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


class RunLogger:
    """Owns one run directory. `resume` reopens an existing one."""

    def __init__(
        self,
        algo: str,
        args: Any,
        meta: Meta,
        *,
        seeds: list[int],
        total_steps: int,
        online_steps: int = 0,
        paper_steps: tuple[int, int] = (1_000_000, 0),
        out_dir: str = "runs",
        resume: str | None = None,
        tensorboard: bool = True,
    ):
        config = dataclasses.asdict(args) if dataclasses.is_dataclass(args) else dict(args)
        if resume:
            self.run_dir = Path(resume)
            if not (self.run_dir / "checkpoint.msgpack").exists():
                raise FileNotFoundError(f"--resume {resume}: no checkpoint.msgpack in that folder")
        else:
            stamp = time.strftime("%Y%m%d-%H%M%S")
            name = f"{meta.dataset_id.replace('/', '-')}__{stamp}-{os.getpid()}"
            self.run_dir = Path(out_dir) / algo / name
            self.run_dir.mkdir(parents=True, exist_ok=True)
        print(f"run directory: {self.run_dir}", flush=True)
        atomic_write(self.run_dir / "config.json", json.dumps(config, indent=2, default=str))
        commit, dirty = git_state()
        tier = "paper" if (total_steps, online_steps) >= paper_steps else "short"
        record_path = self.run_dir / "record.json"
        if resume and record_path.exists():
            self.record = json.loads(record_path.read_text())
        else:
            self.record = {
                "algorithm": algo,
                "dataset": meta.dataset_id,
                "config": config,
                "command": [command_name()] + sys.argv[1:],
                "commit": commit,
                "dirty": dirty,
                "jax_version": jax.__version__,
                "device": device_name(),
                "tier": tier,
                "dataset_size": meta.size,
                "dataset_fingerprint": meta.fingerprint,
                "seeds": seeds,
                "num_seeds": len(seeds),
                "total_steps": total_steps,
                "online_steps": online_steps,
                "wall_time_s": 0.0,
                "evaluations": [],
            }
        self._wall0 = time.time() - self.record["wall_time_s"]
        self.writer = None
        if tensorboard:
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
    def evaluation(self, step: int, result: EvalResult, phase: str = "offline") -> dict:
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
        self.record["wall_time_s"] = round(time.time() - self._wall0, 1)
        atomic_write(self.run_dir / "record.json", json.dumps(self.record, indent=1))
        if self.bar is not None:
            self.bar.set_postfix(score=f"{per_seed.mean():.1f}", refresh=True)
        return self.record["final"]

    # --- checkpoints ---
    def save_checkpoint(self, state: Any, step: int, rng: jax.Array, phase: str = "offline") -> None:
        payload = {"state": state, "step": step, "rng": jax.random.key_data(rng), "phase": phase}
        atomic_write(self.run_dir / "checkpoint.msgpack", serialization.to_bytes(jax.device_get(payload)))

    def load_checkpoint(self, state_template: Any, rng_template: jax.Array):
        """(state, step, rng, phase) from the run directory's checkpoint."""
        template = {
            "state": state_template,
            "step": 0,
            "rng": jax.random.key_data(rng_template),
            "phase": "offline",
        }
        raw = serialization.msgpack_restore((self.run_dir / "checkpoint.msgpack").read_bytes())
        payload = serialization.from_state_dict(template, raw)
        rng = jax.random.wrap_key_data(np.asarray(payload["rng"]))
        return payload["state"], int(payload["step"]), rng, str(payload["phase"])

    def close(self) -> dict:
        if self.bar is not None:
            self.bar.close()
        if self.writer is not None:
            self.writer.close()
        self.record["wall_time_s"] = round(time.time() - self._wall0, 1)
        atomic_write(self.run_dir / "record.json", json.dumps(self.record, indent=1))
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
