"""IQL: signature terms against hand-computed values, seeds, learning, the command line, errors."""

import dataclasses
import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import serialization
from helpers import assert_policy_reloads, only_run_dir, run_algorithm  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "algorithms"))
import iql  # noqa: E402

TINY = dict(hidden_dims=(32, 32), batch_size=64, eval_episodes=3, no_log=True)


def tiny_args(dataset, tmp_path, **kw):
    return iql.Args(dataset=dataset, out_dir=str(tmp_path), **{**TINY, **kw})


def run_dir_of(out: Path) -> Path:
    return only_run_dir(out, "iql")


def actor_params(run_dir: Path) -> dict:
    raw = serialization.msgpack_restore((run_dir / "checkpoint.msgpack").read_bytes())
    return raw["state"]["actor"]  # stacked over seeds


# --- signature terms --------------------------------------------------------------------------
@pytest.mark.parametrize(
    "tau, expected",
    # diff = [2, -1, 0.5, -3]: weight tau where diff > 0, 1 - tau otherwise, times diff^2
    [(0.7, [0.7 * 4, 0.3 * 1, 0.7 * 0.25, 0.3 * 9]), (0.9, [0.9 * 4, 0.1 * 1, 0.9 * 0.25, 0.1 * 9])],
)
def test_expectile_loss_hand_computed(tau, expected):
    diff = jnp.array([2.0, -1.0, 0.5, -3.0])
    np.testing.assert_allclose(iql.expectile_loss(diff, jnp.float32(tau)), expected, rtol=1e-6)


def test_awr_weights_clipped_at_100():
    w = iql.awr_weights(jnp.array([-1.0, 0.0, 1.0, 10.0]), jnp.float32(3.0))
    np.testing.assert_allclose(w, [np.exp(-3.0), 1.0, np.exp(3.0), 100.0], rtol=1e-5)


def test_reward_scaling_is_1000_over_return_range():
    class Meta:
        domain = "locomotion"
        episode_returns = np.array([10.0, 60.0, 35.0])

    rewards, scale, shift = iql.process_rewards(np.array([1.0, 2.0]), Meta)
    assert scale == pytest.approx(1000.0 / 50.0) and shift == 0.0
    np.testing.assert_allclose(rewards, [20.0, 40.0])
    Meta.domain = "antmaze"
    rewards, scale, shift = iql.process_rewards(np.array([0.0, 1.0]), Meta)
    np.testing.assert_allclose(rewards, [-1.0, 0.0])


def test_update_moves_value_toward_expectile_and_has_gradients():
    init, update, _ = iql.make_agent(iql.Args(hidden_dims=(16, 16), total_steps=100, dropout=0.0), 3, 2)
    state = init(jax.random.key(0))
    rng = np.random.default_rng(0)
    batch = iql.Batch(*(jnp.asarray(x, jnp.float32) for x in (
        rng.normal(size=(32, 3)), rng.uniform(-1, 1, (32, 2)), rng.normal(size=32),
        rng.normal(size=(32, 3)), np.ones(32),
    )))  # fmt: skip
    hp = iql.Hyper(*(jnp.float32(x) for x in (0.7, 3.0, 0.99, 0.005)))
    new, metrics = jax.jit(update)(state, batch, jax.random.key(1), hp)
    for old, upd in [(state.value, new.value), (state.critic, new.critic), (state.actor, new.actor)]:
        delta = jax.tree_util.tree_map(lambda a, b: jnp.abs(a - b).max(), old, upd)
        assert max(jax.tree_util.tree_leaves(delta)) > 0
    # The target critic moves by tau of the way, not all of it.
    t_delta = jax.tree_util.tree_map(lambda a, b: jnp.abs(a - b).max(), state.target_critic, new.target_critic)
    c_delta = jax.tree_util.tree_map(lambda a, b: jnp.abs(a - b).max(), state.critic, new.critic)
    assert 0 < max(jax.tree_util.tree_leaves(t_delta)) < max(jax.tree_util.tree_leaves(c_delta))
    assert all(np.isfinite(float(v)) for v in metrics.values())


# --- seeds, learning, records -----------------------------------------------------------------
@pytest.fixture(scope="module")
def three_seed_run(pendulum_dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("three")
    record = iql.train(tiny_args(pendulum_dataset, out, seed=0, num_seeds=3, total_steps=1500, eval_every=500))
    return record, run_dir_of(out)


def test_three_seeds_learn_and_beat_random(three_seed_run, pendulum_dataset):
    from common.data import load_dataset

    record, _ = three_seed_run
    _, meta = load_dataset(pendulum_dataset, to_device=False)
    random_score = 0.0  # ref_min_score is the random policy's return
    final = record["final"]
    assert record["seeds"] == [0, 1, 2] and len(final["per_seed"]) == 3
    assert final["normalized_mean"] >= random_score + 10
    returns = np.asarray(record["evaluations"][-1]["returns"])
    assert returns.mean() >= 0.25 * meta.episode_returns.mean()
    assert [e["step"] for e in record["evaluations"]] == [500, 1000, 1500]
    assert all(e["phase"] == "offline" for e in record["evaluations"])


def test_three_seeds_are_different(three_seed_run):
    _, run_dir = three_seed_run
    params = actor_params(run_dir)
    kernel = np.asarray(params["params"]["MLP_0"]["Dense_0"]["kernel"])  # (3, obs, hidden)
    assert not np.allclose(kernel[0], kernel[1]) and not np.allclose(kernel[1], kernel[2])


def test_seed_of_vmapped_run_matches_single_seed_run(three_seed_run, pendulum_dataset, tmp_path):
    _, run_dir = three_seed_run
    iql.train(tiny_args(pendulum_dataset, tmp_path, seed=2, num_seeds=1, total_steps=1500, eval_every=500))
    single = actor_params(run_dir_of(tmp_path))
    vmapped = actor_params(run_dir)
    leaves = list(zip(jax.tree_util.tree_leaves(vmapped), jax.tree_util.tree_leaves(single)))
    assert max(np.abs(np.asarray(a)[1] - np.asarray(b)[0]).max() for a, b in leaves) > 0.05  # seed 1 is not seed 2
    for a, b in leaves:
        # Equal up to float32 rounding grown over 1,500 updates: one member runs unbatched kernels
        # (common.members.vmap_members), three run batched ones.
        np.testing.assert_allclose(np.asarray(a)[2], np.asarray(b)[0], atol=5e-3, rtol=2e-2)


def test_record_and_config_files(three_seed_run):
    record, run_dir = three_seed_run
    on_disk = json.loads((run_dir / "record.json").read_text())
    assert on_disk["final"] == record["final"] and on_disk["tier"] == "short"
    for key in ("algorithm", "dataset", "config", "command", "commit", "jax_version", "device", "dataset_size",
                "dataset_fingerprint", "wall_time_s", "final_offline"):  # fmt: skip
        assert key in on_disk
    config = json.loads((run_dir / "config.json").read_text())
    assert config["expectile"] == 0.7 and config["beta"] == 3.0  # resolved from the locomotion preset
    assert not list(run_dir.glob(".*.tmp"))  # atomic writes leave no temp files


def test_nonfinite_loss_stops_and_keeps_last_finite_checkpoint(pendulum_dataset, tmp_path):
    iql.train(tiny_args(pendulum_dataset, tmp_path, total_steps=200, eval_every=100))
    run_dir = run_dir_of(tmp_path)
    before = (run_dir / "checkpoint.msgpack").read_bytes()
    args = tiny_args(pendulum_dataset, tmp_path, total_steps=400, eval_every=100, expectile=float("nan"))
    with pytest.raises(FloatingPointError, match=r"seed 0, step 201: .*value_loss=nan"):
        iql.train(dataclasses.replace(args, resume=str(run_dir)))
    assert (run_dir / "checkpoint.msgpack").read_bytes() == before
    leaves = jax.tree_util.tree_leaves(serialization.msgpack_restore(before))
    assert all(np.isfinite(np.asarray(x)).all() for x in leaves if np.asarray(x).dtype.kind == "f")


def test_online_phase_logs_both_phases(pendulum_dataset, tmp_path):
    record = iql.train(tiny_args(pendulum_dataset, tmp_path, total_steps=200, eval_every=100, online_steps=150))
    phases = [(e["phase"], e["step"]) for e in record["evaluations"]]
    assert phases == [("offline", 100), ("offline", 200), ("online", 100), ("online", 150)]
    assert record["final_offline"]["step"] == 200 and record["final"]["step"] == 150


# --- the command line -------------------------------------------------------------------------
def run_cli(*flags, cwd):
    return run_algorithm("iql", *flags, cwd=cwd)


def test_cli_smoke(pendulum_dataset, tmp_path):
    proc = run_cli(
        "--dataset", pendulum_dataset, "--total-steps", "300", "--eval-every", "150", "--hidden-dims", "32", "32",
        "--batch-size", "32", "--eval-episodes", "2", "--out-dir", str(tmp_path), cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.splitlines()[0].startswith("run directory: ")
    run_dir = run_dir_of(tmp_path)
    record = json.loads((run_dir / "record.json").read_text())
    assert record["total_steps"] == 300 and record["command"][0] == "algorithms/iql.py"
    assert "--out-dir" not in record["command"] and str(tmp_path) not in json.dumps(record)  # no path of this machine
    assert list(run_dir.glob("events.out.tfevents*"))  # tensorboard on by default
    assert not (tmp_path / "MUJOCO_LOG.TXT").exists()


def test_cli_bad_flag_gets_tyros_error(tmp_path):
    proc = run_cli("--total-steps", "many", cwd=tmp_path)
    assert proc.returncode == 2
    assert "total-steps" in proc.stderr


def test_policy_reloads_from_the_run_directory(three_seed_run):
    """`load_policy` (what --eval-only uses) rebuilds the policy and reproduces the last evaluation."""
    assert_policy_reloads(three_seed_run[1])
