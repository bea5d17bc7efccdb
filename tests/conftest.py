"""Test-wide environment: temporary Minari root, compilation cache and TMPDIR; no network.

Set before anything imports jax, minari or gymnasium_robotics (they read these at import time).
"""

import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

_TMP = Path(tempfile.mkdtemp(prefix="jaxorl-tests-"))
os.environ["MINARI_DATASETS_PATH"] = str(_TMP / "minari")
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(_TMP / "jax-cache"))
# Every program, not only those compiling in over a second (JAX's default): the suite is mostly
# compilation, and many of its small programs recur in later tests and in their subprocesses.
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # two test workers may share one GPU
os.environ["TMPDIR"] = str(_TMP / "tmp")  # gymnasium-robotics writes a maze XML here per env build
(_TMP / "tmp").mkdir()
tempfile.tempdir = None  # re-read TMPDIR

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


_MUJOCO_LOG = REPO / "MUJOCO_LOG.TXT"
_HAD_MUJOCO_LOG = _MUJOCO_LOG.exists()


def pytest_sessionfinish(session, exitstatus):
    shutil.rmtree(_TMP, ignore_errors=True)
    if _MUJOCO_LOG.exists() and not _HAD_MUJOCO_LOG:
        print(f"\nFAILED: the tests left {_MUJOCO_LOG} behind (silence MuJoCo's warnings)")
        session.exitstatus = 1


@pytest.fixture(autouse=True)
def _silence_mujoco():
    # MuJoCo 4 warns about half_cheetah.xml and appends it to ./MUJOCO_LOG.TXT otherwise.
    import mujoco

    mujoco.set_mju_user_warning(lambda msg: None)


@pytest.fixture(scope="session")
def make_module():
    from common.data import load_make_module

    return load_make_module()


@pytest.fixture(scope="session")
def hopper_expert(make_module):
    """A small expert hopper set (shipped policy): the 'good episodes' short runs learn from."""
    make_module.build("local/hopper/expert-v0", num_steps=5_000, seed=0)
    return "local/hopper/expert-v0"


PENDULUM_ID = "test/pendulum/pd-v0"
PENDULUM_HORIZON = 100


def write_pendulum_set(
    dataset_id: str, controller, num_episodes: int, seed: int, algorithm_name: str, description: str
):
    """Scripted InvertedPendulum-v5 episodes (100 steps at most): action = clip(target + std * noise,
    -3, 3) (the env's Box) with `(target, std) = controller(episode, obs)`. ref_min = a uniformly
    random policy (about 5), ref_max = 100."""
    import gymnasium as gym
    import minari
    import numpy as np
    from minari.data_collector import EpisodeBuffer

    env = gym.make("InvertedPendulum-v5", max_episode_steps=PENDULUM_HORIZON)
    rng = np.random.default_rng(seed)
    buffers = []
    for ep in range(num_episodes):
        obs, _ = env.reset(seed=seed * 10_000 + ep)
        observations, actions, rewards, terms, truncs = [obs], [], [], [], []
        while True:
            target, std = controller(ep, obs)
            a = np.clip(target + std * rng.standard_normal(), -3, 3).astype(np.float32)[None]
            obs, r, term, trunc, _ = env.step(a)
            observations.append(obs), actions.append(a), rewards.append(r), terms.append(term), truncs.append(trunc)
            if term or trunc:
                break
        buffers.append(EpisodeBuffer(id=ep, observations=np.asarray(observations), actions=np.asarray(actions),
                                     rewards=np.asarray(rewards), terminations=np.asarray(terms),
                                     truncations=np.asarray(truncs)))  # fmt: skip
    random_returns = []
    for ep in range(20):
        env.reset(seed=100_000 + ep)
        env.action_space.seed(ep)
        ret, done = 0.0, False
        while not done:
            _, r, term, trunc, _ = env.step(env.action_space.sample())
            ret, done = ret + r, term or trunc
        random_returns.append(ret)
    minari.create_dataset_from_buffers(
        dataset_id, buffers, env=env, algorithm_name=algorithm_name, code_permalink="tests/conftest.py",
        eval_env=env.spec, author="jaxorl tests", author_email="-", ref_min_score=float(np.mean(random_returns)),
        ref_max_score=float(PENDULUM_HORIZON), description=description, data_format="hdf5",
    )  # fmt: skip
    return dataset_id


PD_GAINS = (0.5, 5.0, 0.5, 0.5)


def build_pendulum_dataset(dataset_id: str = PENDULUM_ID, num_episodes: int = 60, noise: float = 0.3, seed: int = 0):
    """A scripted-controller set for tests that need good episodes regardless of which behaviour
    policies are shipped: a PD controller plus Gaussian noise (5x on every third episode)."""
    import numpy as np

    gains = np.array(PD_GAINS)
    controller = lambda ep, obs: (gains @ obs, noise if ep % 3 else 5 * noise)  # noqa: E731
    return write_pendulum_set(dataset_id, controller, num_episodes, seed, "PD controller + noise",
                              "test-only scripted dataset")  # fmt: skip


@pytest.fixture(scope="session")
def pendulum_dataset():
    """Id of a small scripted InvertedPendulum set (about 6k transitions of near-perfect episodes)."""
    from common.data import dataset_dir

    if not (dataset_dir(PENDULUM_ID) / "data").exists():
        build_pendulum_dataset()
    return PENDULUM_ID


MIXED_PENDULUM_ID = "test/pendulum/mixed-v0"


def build_mixed_pendulum_dataset(dataset_id: str = MIXED_PENDULUM_ID, num_good: int = 20, num_poor: int = 150,
                                 noise: float = 0.3, seed: int = 0):  # fmt: skip
    """Good and poor InvertedPendulum-v5 episodes from the same start states, for tests that tell
    an offline RL algorithm from behaviour cloning. Good: the PD controller of
    `build_pendulum_dataset` plus noise (return 100). Poor: full force to one side (+3 plus noise,
    clipped to the Box) until the pole falls (return about 4). The poor episodes outnumber the good
    ones at the start states, so the average action there (what BC learns) pushes the pole over:
    BC scores below random, filtered BC and an algorithm that weighs actions by their returns near
    100. About 2,450 transitions; same reference scores as the pendulum set."""
    import numpy as np

    gains = np.array(PD_GAINS)
    controller = lambda ep, obs: (gains @ obs if ep < num_good else 3.0, noise)  # noqa: E731
    return write_pendulum_set(dataset_id, controller, num_good + num_poor, seed,
                              "PD controller (good) and full push (poor)",
                              "test-only mixed-quality scripted dataset")  # fmt: skip


@pytest.fixture(scope="session")
def mixed_pendulum_dataset():
    """Id of a small mixed-quality InvertedPendulum set (20 good, 150 poor episodes) on which BC
    fails and offline RL need not."""
    from common.data import dataset_dir

    if not (dataset_dir(MIXED_PENDULUM_ID) / "data").exists():
        build_mixed_pendulum_dataset()
    return MIXED_PENDULUM_ID
