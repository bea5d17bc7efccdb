"""Minari datasets -> flat device arrays, plus what an algorithm needs to know about them.

    dataset, meta = load_dataset("local/hopper/medium-v0")

`local/*` ids are built on first use by the repo's `datasets/make.py`; other ids load from
`$MINARI_DATASETS_PATH` or are downloaded through Minari (the `[hf]` extra) when a network is
there. Flat float32 arrays are cached next to the dataset (`jaxorl_flat.npz`).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import gymnasium as gym
import numpy as np

REPO_ROOT = Path(__file__).resolve().parent.parent
DATASET_ID = re.compile(r"^[A-Za-z0-9_\-]+(/[A-Za-z0-9_\-]+)*/[A-Za-z0-9_\-]+-v\d+$")
CACHE_NAME = "jaxorl_flat.npz"
CACHE_VERSION = 1


class UserError(Exception):
    """Bad input (a flag, an id, a file, a path): reported as one line, without a traceback."""


# D4RL's reference returns (random, expert), used where a dataset's metadata has none.
D4RL_REF = {
    "halfcheetah": (-280.178953, 12135.0),
    "hopper": (-20.272305, 3234.3),
    "walker2d": (1.629008, 4592.3),
    "ant": (-325.6, 3879.7),
}


class Dataset(NamedTuple):
    """One row per transition; device arrays once `load_dataset` returns them."""

    observations: np.ndarray  # (N, obs_dim) float32
    actions: np.ndarray  # (N, action_dim) float32
    rewards: np.ndarray  # (N,) float32
    next_observations: np.ndarray  # (N, obs_dim) float32
    terminals: np.ndarray  # (N,) bool: the episode ended in a true terminal state
    truncations: np.ndarray  # (N,) bool: last transition of an episode cut by a time limit / the data's end
    episode_starts: np.ndarray  # (N,) bool
    timesteps: np.ndarray  # (N,) int32, step index within its episode


@dataclass
class Meta:
    dataset_id: str
    env_spec: gym.envs.registration.EnvSpec  # the evaluation env
    observation_space: gym.Space  # of the dataset (dict for goal-reaching sets)
    action_space: gym.spaces.Box
    obs_dim: int
    action_dim: int
    domain: str  # locomotion, antmaze, pointmaze, adroit, kitchen
    ref_min_score: float
    ref_max_score: float
    episode_returns: np.ndarray  # undiscounted return of every episode, in order
    episode_lengths: np.ndarray
    size: int
    fingerprint: str  # sha256 of the flat arrays
    metadata: dict = field(default_factory=dict, repr=False)

    @property
    def robot(self) -> str:
        """The id's robot or task family: hopper in local/hopper/medium-v0, antmaze in D4RL/antmaze/umaze-v1."""
        return task_of(self.dataset_id)[0]

    @property
    def level(self) -> str:
        """The id's dataset level: medium in local/hopper/medium-v0, umaze-sparse in local/pointmaze/umaze-sparse-v0."""
        return task_of(self.dataset_id)[1]

    def to_env_action(self, actions) -> np.ndarray:
        """Algorithm actions in [-1, 1] -> the env's Box [low, high] (the inverse of the mapping
        `load_dataset` applies to the data's actions; the identity where the Box is [-1, 1])."""
        a = np.clip(np.asarray(actions, np.float64), -1.0, 1.0)
        low, high = self.action_space.low.astype(np.float64), self.action_space.high.astype(np.float64)
        if np.all(low == -1.0) and np.all(high == 1.0):
            return a
        return low + (a + 1.0) * 0.5 * (high - low)

    def make_env(self, **kwargs) -> gym.Env:
        """The evaluation environment (registered time limit included)."""
        _register_robotics(self.env_spec.id)
        silence_mujoco()
        if "gymnasium_robotics" not in str(self.env_spec.entry_point):
            return gym.make(self.env_spec, **kwargs)
        # gymnasium-robotics' mazes write an XML file into the temp root on every construction and
        # never delete it; MuJoCo has read it once the env exists, so build in a folder we remove.
        tmp = tempfile.mkdtemp(prefix="jaxorl-env-")
        previous = tempfile.tempdir
        tempfile.tempdir = tmp
        try:
            return gym.make(self.env_spec, **kwargs)
        finally:
            tempfile.tempdir = previous
            shutil.rmtree(tmp, ignore_errors=True)

    def flatten_obs(self, obs) -> np.ndarray:
        """Env observation(s) -> the flat float32 vector the dataset uses."""
        return flatten_observation(obs)

    def normalize(self, returns) -> np.ndarray:
        """Normalized score = 100 * (R - R_min) / (R_max - R_min)."""
        return 100.0 * (np.asarray(returns) - self.ref_min_score) / (self.ref_max_score - self.ref_min_score)


def flatten_observation(obs) -> np.ndarray:
    """Dict observations (AntMaze, PointMaze) become observation + desired goal."""
    if isinstance(obs, dict):
        return np.concatenate([obs["observation"], obs["desired_goal"]], -1).astype(np.float32)
    return np.asarray(obs, np.float32)


def task_of(dataset_id: str) -> tuple[str, str]:
    """(robot, level) of an id, the keys of the per-dataset presets: ("hopper", "medium") for
    local/hopper/medium-v0 and mujoco/hopper/medium-v0, ("antmaze", "umaze") for D4RL/antmaze/umaze-v1."""
    parts = dataset_id.split("/")
    name = parts[-1].rsplit("-v", 1)[0]
    return (parts[-2] if len(parts) > 1 else name).lower(), name.lower()


def check_action_space(dataset_id: str, space) -> None:
    """Box actions with finite bounds; anything else is refused with one clear message."""
    if not isinstance(space, gym.spaces.Box):
        raise UserError(
            f"{dataset_id} has a {type(space).__name__} action space; jaxorl's algorithms need continuous (Box) actions"
        )
    if not (np.all(np.isfinite(space.low)) and np.all(np.isfinite(space.high)) and np.all(space.high > space.low)):
        raise UserError(
            f"{dataset_id}: its Box action space has unbounded or empty bounds (low {space.low}, high {space.high}); "
            "jaxorl's policies act in a bounded Box"
        )


def scale_actions(actions: np.ndarray, space) -> np.ndarray:
    """Dataset actions in [low, high] -> [-1, 1], where every algorithm acts (tanh policies)."""
    low, high = space.low.astype(np.float64), space.high.astype(np.float64)
    if np.all(low == -1.0) and np.all(high == 1.0):
        return actions
    return np.clip(2.0 * (actions - low) / (high - low) - 1.0, -1.0, 1.0).astype(np.float32)


def check_flat(dataset_id: str, flat: dict, path: Path) -> None:
    """Data that cannot train: no episodes, non-finite values, columns of different lengths."""
    n = len(flat["rewards"])
    if n == 0:
        raise UserError(f"{dataset_id} has no transitions ({path}); rebuild or re-download it")
    lengths = {k: len(flat[k]) for k in Dataset._fields}
    if len(set(lengths.values())) != 1:
        raise UserError(f"{dataset_id}: columns of different lengths {lengths} ({path})")
    for k in ("observations", "actions", "rewards", "next_observations"):
        bad = ~np.isfinite(flat[k])
        if bad.any():
            row = int(np.argwhere(bad)[0][0])
            raise UserError(
                f"{dataset_id}: {int(bad.sum())} non-finite values in {k} (first at transition {row}) in {path}; "
                "fix or rebuild the dataset"
            )


def domain_of(dataset_id: str, env_id: str) -> str:
    """locomotion, antmaze, pointmaze, adroit or kitchen, from the id's parts and the env's name."""
    parts = set(dataset_id.lower().split("/")[:-1])
    env = env_id.lower()
    if "antmaze" in parts or env.startswith("antmaze"):
        return "antmaze"
    if "pointmaze" in parts or env.startswith("pointmaze"):
        return "pointmaze"
    if "kitchen" in parts or env.startswith("frankakitchen"):
        return "kitchen"
    if parts & {"door", "pen", "hammer", "relocate"} or env.startswith("adroithand"):
        return "adroit"
    return "locomotion"


def validate_id(dataset_id: str) -> None:
    # Minari leaves a broken folder behind for an id without `-vN`: check before it sees the id.
    if not DATASET_ID.match(dataset_id):
        raise ValueError(
            f"invalid dataset id {dataset_id!r}: expected namespace/name-vN, e.g. "
            "'local/hopper/medium-v0' or 'mujoco/hopper/expert-v0'"
        )


def datasets_root() -> Path:
    return Path(os.environ.get("MINARI_DATASETS_PATH", Path.home() / ".minari" / "datasets"))


def dataset_dir(dataset_id: str) -> Path:
    return datasets_root() / dataset_id


def silence_mujoco() -> None:
    """MuJoCo 4 warns about gymnasium's half_cheetah.xml on every build and appends the warning to
    ./MUJOCO_LOG.TXT; a no-op warning callback silences both."""
    import mujoco

    mujoco.set_mju_user_warning(lambda msg: None)


def _register_robotics(env_id: str) -> None:
    if env_id in gym.registry:
        return
    try:
        import gymnasium_robotics
    except ImportError as e:
        raise ImportError(f"environment {env_id} needs gymnasium-robotics: pip install gymnasium-robotics") from e
    gym.register_envs(gymnasium_robotics)


def load_make_module():
    """The repo's datasets/make.py, loaded by path (a top-level `datasets` is HuggingFace's)."""
    path = REPO_ROOT / "datasets" / "make.py"
    if not path.exists():
        raise FileNotFoundError(
            f"local datasets are built by the jaxorl repository's datasets/make.py, not found at {path}; "
            "clone the repository to use local/* ids, or use a Minari id"
        )
    if "jaxorl_make" in sys.modules:
        return sys.modules["jaxorl_make"]
    spec = importlib.util.spec_from_file_location("jaxorl_make", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["jaxorl_make"] = module
    spec.loader.exec_module(module)
    return module


def _ensure_available(dataset_id: str) -> None:
    if (dataset_dir(dataset_id) / "data" / "main_data.hdf5").exists():
        return
    if dataset_id.startswith("local/"):
        print(f"[jaxorl] {dataset_id} is not built yet: building it with datasets/make.py", flush=True)
        try:
            load_make_module().build(dataset_id)
        except (PermissionError, NotADirectoryError, IsADirectoryError) as e:  # an unwritable MINARI_DATASETS_PATH
            raise UserError(
                f"cannot build {dataset_id} into {datasets_root()}: {e.strerror or e} ({e.filename}); "
                "set MINARI_DATASETS_PATH to a folder you can write to"
            ) from None
        return
    import minari

    try:
        minari.download_dataset(dataset_id)
    except Exception as e:  # no network, no [hf] extra, unknown id: one clear message
        raise FileNotFoundError(
            f"dataset {dataset_id!r} is not in {datasets_root()} and could not be downloaded "
            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}).\n"
            f"  download it where there is a network: pip install 'jaxorl[hf]' && minari download {dataset_id}\n"
            "  (then copy it into $MINARI_DATASETS_PATH), or build a local dataset: "
            "python datasets/make.py --list"
        ) from None


def _flatten_episodes(ds) -> dict:
    cols = {k: [] for k in ("observations", "actions", "rewards", "next_observations", "terminals", "truncations")}
    lengths, returns = [], []
    for ep in ds.iterate_episodes():
        obs = flatten_observation(ep.observations)  # T + 1 rows
        T = len(ep.rewards)
        sizes = (len(obs) - 1, len(ep.actions), len(ep.terminations), len(ep.truncations))
        if any(size != T for size in sizes):
            raise UserError(
                f"episode {ep.id} has {T} rewards but {sizes[0] + 1} observations, {sizes[1]} actions, "
                f"{sizes[2]} terminations and {sizes[3]} truncations (expected T + 1, T, T, T)"
            )
        term = np.asarray(ep.terminations, bool)
        trunc = np.asarray(ep.truncations, bool).copy()
        trunc[-1] = not term[-1]  # an episode that did not terminate was cut: by a time limit or the data's end
        cols["observations"].append(obs[:-1])
        cols["next_observations"].append(obs[1:])
        cols["actions"].append(np.asarray(ep.actions, np.float32).reshape(T, -1))
        cols["rewards"].append(np.asarray(ep.rewards, np.float32))
        cols["terminals"].append(term)
        cols["truncations"].append(trunc)
        lengths.append(T)
        returns.append(float(np.sum(ep.rewards, dtype=np.float64)))
    if not lengths:  # no episodes: check_flat reports it
        return {**{k: np.zeros(0) for k in (*cols, "episode_starts", "timesteps")},
                "episode_lengths": np.zeros(0, np.int64), "episode_returns": np.zeros(0)}  # fmt: skip
    flat = {k: np.concatenate(v) for k, v in cols.items()}
    lengths = np.asarray(lengths, np.int64)
    starts = np.zeros(lengths.sum(), bool)
    starts[np.concatenate([[0], np.cumsum(lengths)[:-1]])] = True
    flat["episode_starts"] = starts
    flat["timesteps"] = (np.arange(lengths.sum()) - np.repeat(np.cumsum(lengths) - lengths, lengths)).astype(np.int32)
    flat["episode_lengths"], flat["episode_returns"] = lengths, np.asarray(returns)
    return flat


def _load_flat(dataset_id: str) -> dict:
    """Flat arrays, from the cache when the hdf5 file is unchanged (size and mtime)."""
    hdf5 = dataset_dir(dataset_id) / "data" / "main_data.hdf5"
    stat = hdf5.stat()
    key = np.asarray([CACHE_VERSION, stat.st_size, stat.st_mtime_ns], np.int64)
    cache = dataset_dir(dataset_id) / CACHE_NAME
    if cache.exists():
        try:
            with np.load(cache) as z:
                if np.array_equal(z["cache_key"], key):
                    return {k: z[k] for k in z.files if k != "cache_key"}
        except (OSError, ValueError, KeyError):
            pass  # unreadable cache: rebuild it
    import minari

    flat = _flatten_episodes(minari.load_dataset(dataset_id))
    tmp = cache.with_name(f".{CACHE_NAME}.{os.getpid()}.tmp.npz")
    try:
        np.savez(tmp, cache_key=key, **flat)
        os.replace(tmp, cache)
    except OSError:  # a read-only dataset folder: load without caching
        tmp.unlink(missing_ok=True)
    return flat


def fingerprint(flat: dict) -> str:
    h = hashlib.sha256()
    for k in Dataset._fields:
        h.update(np.ascontiguousarray(flat[k]).tobytes())
    return h.hexdigest()


def load_dataset(dataset_id: str, *, to_device: bool = True) -> tuple[Dataset, Meta]:
    """Load (building or downloading if needed) a Minari dataset as flat arrays and its Meta."""
    validate_id(dataset_id)
    _ensure_available(dataset_id)
    metadata = json.loads((dataset_dir(dataset_id) / "data" / "metadata.json").read_text())
    import minari

    hdf5 = dataset_dir(dataset_id) / "data" / "main_data.hdf5"
    try:
        ds = minari.load_dataset(dataset_id)
    except Exception as e:
        raise UserError(
            f"cannot read {dataset_id} at {hdf5} ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
            "is it truncated? rebuild it (local ids: python datasets/make.py ID --force) or download it again"
        ) from None
    check_action_space(dataset_id, ds.action_space)
    spec = getattr(ds, "_eval_env_spec", None) or ds.spec.env_spec  # Minari keeps the eval spec here
    if spec is None:
        raise ValueError(f"{dataset_id} records no environment spec, so it cannot be evaluated")
    try:
        flat = _load_flat(dataset_id)
    except UserError as e:
        raise UserError(f"{dataset_id} ({hdf5}): {e}") from None
    except (OSError, KeyError, ValueError) as e:
        raise UserError(
            f"cannot read the episodes of {dataset_id} in {hdf5} ({type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''}); rebuild or re-download it"
        ) from None
    check_flat(dataset_id, flat, hdf5)
    flat["actions"] = scale_actions(flat["actions"], ds.action_space)
    env_name = spec.id.split("-")[0].lower()
    ref_min, ref_max = metadata.get("ref_min_score"), metadata.get("ref_max_score")
    if ref_min is None or ref_max is None:
        if env_name not in D4RL_REF:
            raise ValueError(f"{dataset_id} has no reference scores and {spec.id} has no D4RL reference returns")
        ref_min, ref_max = D4RL_REF[env_name]
    meta = Meta(
        dataset_id=dataset_id,
        env_spec=spec,
        observation_space=ds.observation_space,
        action_space=ds.action_space,
        obs_dim=flat["observations"].shape[1],
        action_dim=flat["actions"].shape[1],
        domain=domain_of(dataset_id, spec.id),
        ref_min_score=float(ref_min),
        ref_max_score=float(ref_max),
        episode_returns=flat["episode_returns"],
        episode_lengths=flat["episode_lengths"],
        size=len(flat["rewards"]),
        fingerprint=fingerprint(flat),
        metadata=metadata,
    )
    data = Dataset(**{k: flat[k] for k in Dataset._fields})
    if to_device:
        import jax

        data = Dataset(*(jax.device_put(x) for x in data))
    return data, meta
