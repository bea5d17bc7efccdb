"""Behaviour policies of the local locomotion datasets: the robots, their reference returns, and a
numpy forward pass of the SAC actor that `sac.py` trains and `make.py` collects with.

Inference runs in numpy on the CPU so that a rebuild of a dataset does not depend on the JAX
backend; the actor is small (two hidden layers), so batching over a few environments is enough.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
POLICY_DIR = HERE / "policies"
MANIFEST = POLICY_DIR / "manifest.json"

# robot -> Gymnasium env id (MuJoCo v5 robots, as Minari's mujoco/* datasets use).
ROBOTS = {"halfcheetah": "HalfCheetah-v5", "hopper": "Hopper-v5", "walker2d": "Walker2d-v5"}
# D4RL's reference returns (d4rl/infos.py), used for every locomotion score in this repo.
REF_SCORES = {
    "halfcheetah": (-280.178953, 12135.0),
    "hopper": (-20.272305, 3234.3),
    "walker2d": (1.629008, 4592.3),
}
# The actor squashes its log-std into this range (as CleanRL's SAC does).
LOG_STD_MIN, LOG_STD_MAX = -5.0, 2.0


def normalized_score(robot: str, ret: float) -> float:
    lo, hi = REF_SCORES[robot]
    return 100.0 * (ret - lo) / (hi - lo)


def load_params(path: str | Path) -> dict:
    """Actor parameters from a flax msgpack file, as nested dicts of float32 numpy arrays."""
    from flax import serialization  # imported here: collection workers need only numpy

    raw = serialization.msgpack_restore(Path(path).read_bytes())
    return {k: {n: np.asarray(v, np.float32) for n, v in layer.items()} for k, layer in raw.items()}


def actor_forward(params: dict, obs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(mean, log_std) of the pre-tanh Gaussian for a batch of observations [B, obs_dim]."""
    h = np.asarray(obs, np.float32)
    hidden = sorted((k for k in params if k.startswith("Dense_")), key=lambda k: int(k[6:]))
    for name in hidden:
        h = np.maximum(h @ params[name]["kernel"] + params[name]["bias"], 0.0)
    mean = h @ params["mean"]["kernel"] + params["mean"]["bias"]
    raw = h @ params["log_std"]["kernel"] + params["log_std"]["bias"]
    log_std = LOG_STD_MIN + 0.5 * (LOG_STD_MAX - LOG_STD_MIN) * (np.tanh(raw) + 1.0)
    return mean, log_std


def act(params: dict, obs: np.ndarray, noise: np.ndarray | None) -> np.ndarray:
    """tanh(mean + std * noise); `noise=None` gives the deterministic action tanh(mean)."""
    mean, log_std = actor_forward(params, obs)
    if noise is not None:
        mean = mean + np.exp(log_std) * noise
    return np.tanh(mean).astype(np.float32)


def read_manifest() -> dict:
    if not MANIFEST.exists():
        return {}
    return json.loads(MANIFEST.read_text())


def policy_path(robot: str, level: str) -> Path:
    """File of a shipped policy ('random', 'medium' or 'expert'); a clear error if not shipped."""
    entry = read_manifest().get(robot, {}).get(level)
    if entry is None:
        raise FileNotFoundError(
            f"no shipped {level} policy for {robot} in {MANIFEST}; train one with "
            f"`python datasets/sac.py --robot {robot}` and ship it with `python datasets/sac.py "
            f"--robot {robot} --ship`"
        )
    return POLICY_DIR / entry["file"]


def replay_paths(robot: str) -> list[Path]:
    """Shipped snapshots from initialization up to medium, in training order."""
    entry = read_manifest().get(robot, {})
    if "replay" not in entry:
        policy_path(robot, "medium")  # raises the same clear error
    return [POLICY_DIR / s["file"] for s in entry["replay"]]


def silence_mujoco() -> None:
    """MuJoCo 4 warns about `settotalmass` in half_cheetah.xml on every env build and appends the
    warning to ./MUJOCO_LOG.TXT; a no-op warning callback silences both."""
    import mujoco

    mujoco.set_mju_user_warning(lambda msg: None)
