"""datasets/make.py: local locomotion datasets from the shipped SAC policies (small builds)."""

import subprocess
import sys

import minari
import numpy as np
import pytest

from common.data import REPO_ROOT, dataset_dir

LEVELS = ["random", "medium", "medium-replay", "expert", "medium-expert"]
SMALL = 2_000
# Medium episodes vary most (many fall early, some run 1000 steps): a larger sample orders returns reliably.
SIZES = {"medium": 10_000, "medium-expert": 4_000}


@pytest.fixture(scope="module")
def built(make_module):
    for level in LEVELS:
        make_module.build(f"local/hopper/{level}-v0", num_steps=SIZES.get(level, SMALL), seed=0)
    return {level: minari.load_dataset(f"local/hopper/{level}-v0") for level in LEVELS}


def episodes(ds):
    return list(ds.iterate_episodes())


def test_every_level_builds_and_loads(built, make_module):
    for level, ds in built.items():
        assert ds.total_steps >= SIZES.get(level, SMALL), level
        assert ds.observation_space.shape == (11,) and ds.action_space.shape == (3,)
        meta = ds.storage.metadata
        assert meta["ref_min_score"] == pytest.approx(-20.272305) and meta["ref_max_score"] == pytest.approx(3234.3)
        assert meta["env_spec"] and "Hopper-v5" in meta["env_spec"] and "Hopper-v5" in meta["eval_env_spec"]
        assert "datasets/make.py" in meta["description"] and "code version" in meta["description"]
        # Whole episodes: the last one of each policy is finished, so at most one episode (1000 steps)
        # per policy beyond the target.
        policies = {"medium-expert": 2, "medium-replay": len(make_module.replay_paths("hopper"))}.get(level, 1)
        assert ds.total_steps < SIZES.get(level, SMALL) + 1000 * policies


def test_terminations_only_where_the_robot_fell_and_truncation_at_1000(built):
    for level, ds in built.items():
        for ep in episodes(ds):
            T = len(ep.rewards)
            assert T <= 1000
            assert not ep.terminations[:-1].any() and not ep.truncations[:-1].any()
            assert ep.terminations[-1] != ep.truncations[-1], level  # every episode ends exactly one way
            if ep.truncations[-1]:
                assert T == 1000, (level, T)
            z, angle, rest = ep.observations[:, 0], ep.observations[:, 1], ep.observations[:, 1:]
            healthy = (z > 0.7) & (np.abs(angle) < 0.2) & (np.abs(rest) < 100).all(1)
            assert healthy[1:-1].all()  # nothing before the end fell
            assert healthy[-1] != ep.terminations[-1]  # terminated iff the last state fell


def test_returns_ordered_expert_medium_random(built):
    mean_return = {lvl: np.mean([ep.rewards.sum() for ep in episodes(built[lvl])]) for lvl in LEVELS}
    assert mean_return["expert"] > mean_return["medium"] > mean_return["random"]


def test_same_seed_identical_other_seed_differs(make_module):
    from common.data import load_dataset

    make_module.build("local/hopper/random-v0", num_steps=SMALL, seed=0)
    a, _ = load_dataset("local/hopper/random-v0", to_device=False)
    make_module.build("local/hopper/random-v0", num_steps=SMALL, seed=0, force=True)
    b, _ = load_dataset("local/hopper/random-v0", to_device=False)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)
    make_module.build("local/hopper/random-v0", num_steps=SMALL, seed=1, force=True)
    c, _ = load_dataset("local/hopper/random-v0", to_device=False)
    assert c.observations.shape != a.observations.shape or not np.array_equal(c.observations, a.observations)
    make_module.build("local/hopper/random-v0", num_steps=SMALL, seed=0, force=True)  # leave the seed-0 set


def test_already_built_is_skipped(make_module, built, capsys):
    make_module.build("local/hopper/random-v0", num_steps=SMALL)
    assert "already built" in capsys.readouterr().out


@pytest.mark.parametrize("bad", ["local/hopper/superb-v0", "local/ant/medium-v0", "local/hopper/medium-v1"])
def test_bad_ids_list_the_valid_ones(make_module, bad):
    with pytest.raises(ValueError, match="local/walker2d/medium-expert-v0"):
        make_module.build(bad)
    assert not dataset_dir(bad).exists()


def test_cli_list_and_bad_id():
    make = str(REPO_ROOT / "datasets" / "make.py")
    out = subprocess.run([sys.executable, make, "--list"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "local/halfcheetah/medium-replay-v0" in out.stdout
    assert len([line for line in out.stdout.splitlines() if line.startswith("local/")]) == 23
    bad = subprocess.run([sys.executable, make, "local/hopper/nope-v0"], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "local/hopper/medium-v0" in bad.stderr


def test_interrupted_build_leaves_nothing(make_module, monkeypatch, tmp_path):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(make_module, "collect_level", interrupted)
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path))
    with pytest.raises(KeyboardInterrupt):
        make_module.build("local/hopper/random-v0", num_steps=SMALL)
    assert not (tmp_path / "local" / "hopper" / "random-v0").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".staging")]
    assert minari.list_local_datasets() == {}


def test_interrupted_rebuild_keeps_the_old_dataset(make_module, built, monkeypatch):
    from common.data import load_dataset

    before, _ = load_dataset("local/hopper/random-v0", to_device=False)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(make_module, "collect_level", interrupted)
    with pytest.raises(KeyboardInterrupt):
        make_module.build("local/hopper/random-v0", num_steps=SMALL, force=True)
    after, _ = load_dataset("local/hopper/random-v0", to_device=False)
    np.testing.assert_array_equal(before.observations, after.observations)
    assert not [p for p in dataset_dir("local").parent.iterdir() if p.name.startswith(".staging")]


@pytest.mark.parametrize(
    "robot, env_id, obs_dim, act_dim, can_fall",
    [("walker2d", "Walker2d-v5", 17, 6, True), ("halfcheetah", "HalfCheetah-v5", 17, 6, False)],
)
def test_other_robots_build_with_ordered_returns(make_module, robot, env_id, obs_dim, act_dim, can_fall):
    mean_return = {}
    for level in ["random", "medium", "expert"]:
        ds_id = f"local/{robot}/{level}-v0"
        make_module.build(ds_id, num_steps=SMALL, seed=0)
        ds = minari.load_dataset(ds_id)
        assert ds.observation_space.shape == (obs_dim,) and ds.action_space.shape == (act_dim,)
        meta = ds.storage.metadata
        assert (meta["ref_min_score"], meta["ref_max_score"]) == pytest.approx(make_module.REF_SCORES[robot])
        assert env_id in meta["eval_env_spec"]
        eps = episodes(ds)
        if not can_fall:  # the cheetah never terminates: every episode runs to the 1000-step limit
            assert all(len(ep.rewards) == 1000 and ep.truncations[-1] and not ep.terminations.any() for ep in eps)
        mean_return[level] = np.mean([ep.rewards.sum() for ep in eps])
    assert mean_return["expert"] > mean_return["medium"] > mean_return["random"], mean_return
