"""BC: the loss against a hand-computed value, %BC's episode filter, state statistics, learning,
the command line and the run-directory contract (resume alone, mismatched flags, finished runs)."""

import json
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import serialization
from helpers import assert_policy_reloads, only_run_dir, run_algorithm, snapshot  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "algorithms"))
import bc  # noqa: E402

TINY = dict(hidden_dims=(32, 32), batch_size=64, eval_episodes=3, no_log=True)


def tiny_args(dataset, out, **kw):
    return bc.Args(dataset=dataset, out_dir=str(out), **{**TINY, **kw})


def run_dir_of(out: Path) -> Path:
    return only_run_dir(out, "bc")


def checkpoint(run_dir: Path) -> dict:
    return serialization.msgpack_restore((run_dir / "checkpoint.msgpack").read_bytes())


def run_cli(*flags, cwd):
    return run_algorithm("bc", *flags, cwd=cwd)


# --- the loss, the filter, the statistics -----------------------------------------------------
def test_bc_loss_is_mse_over_batch_and_action_dims():
    class Linear:  # stands in for the actor: pred = obs @ w
        @staticmethod
        def apply(w, obs):
            return obs @ w

    w = jnp.array([[1.0, 0.0], [0.0, -1.0]])
    obs = jnp.array([[0.5, 0.5], [1.0, 0.0]])  # pred [[0.5, -0.5], [1.0, 0.0]]
    actions = jnp.array([[0.0, 0.0], [0.5, 0.5]])  # squared errors 0.25, 0.25, 0.25, 0.25
    loss, metrics = bc.bc_loss(w, Linear, obs, actions)
    assert float(loss) == pytest.approx(0.25)
    assert float(metrics["bc_loss"]) == pytest.approx(0.25) and float(metrics["action_abs"]) == pytest.approx(0.5)
    grad = jax.grad(lambda p: bc.bc_loss(p, Linear, obs, actions)[0])(w)
    # d/dw mean((obs @ w - a)^2) = 2 obs^T (obs @ w - a) / 4
    np.testing.assert_allclose(grad, 2 * obs.T @ (obs @ w - actions) / 4, rtol=1e-6)


def test_top_episodes_keeps_the_best_by_return():
    returns = np.array([5.0, 50.0, 20.0, 50.0, 1.0, 30.0, 10.0, 40.0, 2.0, 25.0])
    assert bc.top_episodes(returns, 0.3).tolist() == [1, 3, 7]  # ties: dataset order
    assert bc.top_episodes(returns, 0.1).tolist() == [1]
    assert bc.top_episodes(returns, 0.01).tolist() == [1]  # at least one episode
    assert sorted(bc.top_episodes(returns, 1.0).tolist()) == list(range(10))
    assert len(bc.top_episodes(np.arange(100.0), 0.29)) == 29  # not 28 from 0.29 * 100 = 28.999...
    lengths = np.array([3, 2, 4])  # rows 0-2, 3-4, 5-8
    assert bc.episode_rows(lengths, np.array([2, 0])).tolist() == [0, 1, 2, 5, 6, 7, 8]


def test_state_stats_and_the_policy_applies_them():
    obs = np.array([[1.0, 10.0], [3.0, 10.0], [5.0, 10.0]], np.float32)
    mean, std = bc.state_stats(obs)
    np.testing.assert_allclose(mean, [3.0, 10.0])
    np.testing.assert_allclose(std, [np.sqrt(8 / 3) + 1e-3, 1e-3], rtol=1e-6)  # std (ddof 0) + 1e-3
    mean0, std0 = bc.state_stats(obs, normalize=False)
    assert mean0.tolist() == [0.0, 0.0] and std0.tolist() == [1.0, 1.0]
    init, _, act = bc.make_agent(bc.Args(hidden_dims=(8,)), 2, 1)
    state = init(jax.random.key(0), mean, std)
    np.testing.assert_allclose(act(state, obs), bc.Actor((8,), 1).apply(state.actor, (obs - mean) / std), rtol=1e-6)


def test_validate_refuses_top_fraction_outside_0_1():
    for bad in (0.0, -0.1, 1.5, float("nan")):
        with pytest.raises(bc.UserError, match=r"--top-fraction must be in \(0, 1\]"):
            bc.validate(bc.Args(top_fraction=bad))
    bc.validate(bc.Args(top_fraction=1.0))
    assert bc.variant(1.0) == "BC" and bc.variant(0.1) == "10% BC" and bc.variant(0.25) == "25% BC"


# --- learning and filtered BC on the pendulum set ---------------------------------------------
def test_short_run_beats_random(pendulum_dataset, tmp_path):
    from common.data import load_dataset

    record = bc.train(tiny_args(pendulum_dataset, tmp_path, num_seeds=2, total_steps=600, eval_every=300))
    _, meta = load_dataset(pendulum_dataset, to_device=False)
    assert record["algorithm"] == "bc" and record["config"]["top_fraction"] == 1.0 and record["tier"] == "short"
    assert [e["step"] for e in record["evaluations"]] == [300, 600] and record["seeds"] == [0, 1]
    assert record["final"]["normalized_mean"] >= 10  # random is 0
    assert np.mean(record["evaluations"][-1]["returns"]) >= 0.25 * meta.episode_returns.mean()


def test_top_fraction_clones_the_best_episodes_with_their_statistics(pendulum_dataset, tmp_path):
    from common.data import load_dataset

    data, meta = load_dataset(pendulum_dataset, to_device=False)
    record = bc.train(tiny_args(pendulum_dataset, tmp_path, top_fraction=0.1, total_steps=50, eval_every=50))
    assert record["algorithm"] == "bc" and record["config"]["top_fraction"] == 0.1
    # Independently: the 6 of 60 episodes with the highest returns, and their observations.
    order = sorted(range(len(meta.episode_returns)), key=lambda e: (-meta.episode_returns[e], e))[:6]
    starts = np.flatnonzero(data.episode_starts)
    rows = np.concatenate([np.arange(starts[e], starts[e] + meta.episode_lengths[e]) for e in order])
    assert min(meta.episode_returns[order]) >= np.sort(meta.episode_returns)[-6]
    obs = np.asarray(data.observations, np.float64)[rows]
    state = checkpoint(run_dir_of(tmp_path))["state"]
    np.testing.assert_allclose(state["obs_mean"][0], obs.mean(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(state["obs_std"][0], obs.std(0) + 1e-3, rtol=1e-5, atol=1e-6)
    all_obs = np.asarray(data.observations, np.float64)
    assert not np.allclose(state["obs_std"][0], all_obs.std(0) + 1e-3, rtol=1e-3)  # not the whole set's


# --- the command line and the run directory ---------------------------------------------------
def test_cli_end_to_end(pendulum_dataset, tmp_path):
    proc = run_cli(
        "--dataset", pendulum_dataset, "--total-steps", "300", "--eval-every", "150", "--hidden-dims", "32", "32",
        "--batch-size", "32", "--eval-episodes", "2", "--out-dir", str(tmp_path), cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.splitlines()[0].startswith("run directory: ")
    run_dir = run_dir_of(tmp_path)
    record = json.loads((run_dir / "record.json").read_text())
    assert record["command"][0] == "algorithms/bc.py" and record["finished"]
    assert [e["step"] for e in record["evaluations"]] == [150, 300]
    assert "BC on test/pendulum/pd-v0 (locomotion): 60 of 60 episodes" in proc.stdout
    assert json.loads((run_dir / "config.json").read_text())["eval_episodes"] == 2
    assert list(run_dir.glob("events.out.tfevents*"))  # tensorboard on by default
    assert not list(run_dir.glob(".*.tmp"))


def test_cli_bad_top_fraction_is_one_line_and_no_folder(tmp_path):
    proc = run_cli("--top-fraction", "0", "--out-dir", str(tmp_path / "runs"), cwd=tmp_path)
    assert proc.returncode == 1
    expected = "error: --top-fraction must be in (0, 1] (1: plain BC, 0.1: 10% BC), got 0.0"
    assert proc.stderr.strip().splitlines() == [expected]
    assert not (tmp_path / "runs").exists()


@pytest.fixture(scope="module")
def short_run(pendulum_dataset, tmp_path_factory):
    """A 200-update run with non-default flags, made in-process (the resume tests continue it)."""
    out = tmp_path_factory.mktemp("short")
    args = tiny_args(pendulum_dataset, out, hidden_dims=(16, 16), top_fraction=0.5, total_steps=200, eval_every=100)
    bc.train(args)
    return args, run_dir_of(out)


def test_resume_with_a_mismatched_flag_is_refused_fast_and_changes_nothing(short_run, tmp_path):
    _, run_dir = short_run
    before = snapshot(run_dir)
    t0 = time.time()
    proc = run_cli("--resume", str(run_dir), "--hidden-dims", "32", "32", cwd=tmp_path)
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "--hidden-dims [32, 32] differs from the run's [16, 16]" in lines[0], proc.stderr
    assert time.time() - t0 < 60  # refused before the dataset loads or anything compiles
    assert snapshot(run_dir) == before


def test_resume_of_a_finished_run_changes_nothing(short_run, tmp_path):
    _, run_dir = short_run
    before = snapshot(run_dir)
    proc = run_cli("--resume", str(run_dir), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "the run is finished" in proc.stdout
    assert snapshot(run_dir) == before


def test_resume_alone_continues_from_its_config_like_an_uninterrupted_run(short_run, pendulum_dataset, tmp_path):
    args, run_dir = short_run
    proc = run_cli("--resume", str(run_dir), "--total-steps", "400", cwd=tmp_path)  # no --dataset, no sizes
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = json.loads((run_dir / "record.json").read_text())
    assert record["dataset"] == pendulum_dataset and record["config"]["top_fraction"] == 0.5
    assert "50% BC on test/pendulum/pd-v0" in proc.stdout
    assert [e["step"] for e in record["evaluations"]] == [100, 200, 300, 400]
    assert record["total_steps"] == 400 and record["finished"]
    assert json.loads((run_dir / "config.json").read_text())["hidden_dims"] == [16, 16]
    # The same as a run that was never interrupted.
    whole = bc.train(tiny_args(pendulum_dataset, tmp_path, hidden_dims=(16, 16), top_fraction=0.5,
                               total_steps=400, eval_every=100))  # fmt: skip
    assert [e["returns"] for e in whole["evaluations"]] == [e["returns"] for e in record["evaluations"]]
    ours, theirs = checkpoint(run_dir)["state"], checkpoint(run_dir_of(tmp_path))["state"]
    for a, b in zip(jax.tree_util.tree_leaves(ours), jax.tree_util.tree_leaves(theirs)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)


def test_policy_reloads_from_the_run_directory(short_run):
    """`load_policy` (what --eval-only uses) rebuilds the policy and reproduces the last evaluation."""
    assert_policy_reloads(short_run[1])


def test_a_sweep_point_equals_the_plain_run_with_its_lr(pendulum_dataset, tmp_path):
    """--sweep lr=3e-4,1e-3 with 2 seeds: members 2-3 (point 1) end exactly where a plain run at lr 1e-3 ends."""
    flags = dict(num_seeds=2, total_steps=100, eval_every=100)
    record = bc.train(tiny_args(pendulum_dataset, tmp_path / "sweep", sweep=("lr=3e-4,1e-3",), **flags))
    bc.train(tiny_args(pendulum_dataset, tmp_path / "plain", lr=1e-3, **flags))
    swept = checkpoint(run_dir_of(tmp_path / "sweep"))["state"]
    alone = checkpoint(run_dir_of(tmp_path / "plain"))["state"]
    for a, b in zip(jax.tree_util.tree_leaves(swept), jax.tree_util.tree_leaves(alone), strict=True):
        assert np.shape(a)[0] == 4  # members: 2 points x 2 seeds
        np.testing.assert_allclose(np.asarray(a)[2:4], np.asarray(b), atol=2e-4, rtol=2e-3)
    assert [p["point"] for p in record["final_per_point"]] == [{"lr": 3e-4}, {"lr": 1e-3}]
    assert record["sweep"]["points"] == [{"lr": 3e-4}, {"lr": 1e-3}]
    assert_policy_reloads(run_dir_of(tmp_path / "sweep"))  # --eval-only: the checkpoint fits the tiled states
