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
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TMPDIR"] = str(_TMP / "tmp")  # gymnasium-robotics writes a maze XML here per env build
(_TMP / "tmp").mkdir()
tempfile.tempdir = None  # re-read TMPDIR

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def pytest_sessionfinish(session, exitstatus):
    shutil.rmtree(_TMP, ignore_errors=True)


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
