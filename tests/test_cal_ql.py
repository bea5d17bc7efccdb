"""Cal-QL: Monte-Carlo returns and the calibrated bound against hand-computed values, the mixed
online batch, offline-to-online learning, the command line."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "algorithms"))
import cal_ql  # noqa: E402

TINY = dict(hidden_dims=(64, 64), batch_size=64, eval_episodes=5, no_log=True)
LOG2 = math.log(2.0)


# --- Monte-Carlo returns ----------------------------------------------------------------------
def test_mc_returns_terminal_truncated_and_sparse_failure_hand_computed():
    # Four episodes in one flat array, gamma 0.5: terminal [1, 2, 3]; truncated [4, 0, 2] (not
    # bootstrapped); an all-failure sparse episode [-5, -5]; a sparse success [-5, 5].
    rewards = [1, 2, 3, 4, 0, 2, -5, -5, -5, 5]
    terminals = [0, 0, 1, 0, 0, 0, 0, 0, 0, 1]
    ends = [0, 0, 1, 0, 0, 1, 0, 1, 0, 1]
    expected = [
        1 + 0.5 * 2 + 0.25 * 3, 2 + 0.5 * 3, 3,
        4 + 0.5 * 0 + 0.25 * 2, 0 + 0.5 * 2, 2,
        -5 / (1 - 0.5), -5 / (1 - 0.5),  # r_neg / (1 - gamma) everywhere
        -5 + 0.5 * 5, 5,
    ]  # fmt: skip
    got = cal_ql.mc_returns(np.array(rewards, float), np.array(terminals, bool), np.array(ends, bool), 0.5, -5.0)
    np.testing.assert_allclose(got, expected, rtol=1e-6)
    # Dense rewards (no failure reward): the all -5 episode is an ordinary discounted sum.
    dense = cal_ql.mc_returns(np.array(rewards, float), np.array(terminals, bool), np.array(ends, bool), 0.5)
    np.testing.assert_allclose(dense[6:8], [-5 - 2.5, -5], rtol=1e-6)
    np.testing.assert_allclose(dense[:6], expected[:6], rtol=1e-6)


def test_dataset_mc_returns_follow_episode_boundaries(pendulum_dataset):
    from common.data import load_dataset

    data, meta = load_dataset(pendulum_dataset, to_device=False)
    ends = np.append(data.episode_starts[1:], True)
    g = cal_ql.mc_returns(data.rewards, data.terminals, ends, 0.99)
    last = np.flatnonzero(ends)
    np.testing.assert_allclose(g[last], data.rewards[last])  # no bootstrap past an episode's end
    first = np.append(np.flatnonzero(data.episode_starts), len(g))
    for a, b in zip(first[:-1], first[1:]):  # the forward discounted sum of each episode
        assert g[a] == pytest.approx(np.sum(data.rewards[a:b] * 0.99 ** np.arange(b - a)), rel=1e-4)
    assert len(first) - 1 == len(meta.episode_lengths)


# --- the calibrated bound ---------------------------------------------------------------------
# One state, two critics, N = 2 sampled actions per proposal, |A| = 1, MC return 0.8.
Q_DATA = [[0.3], [0.5]]
Q_RAND = [[[0.2, -0.3]], [[0.0, 1.1]]]
Q_NEXT = [[[1.5, 0.7]], [[0.4, 0.9]]]
Q_CUR = [[[2.0, -1.0]], [[1.2, 0.6]]]
LOGP_NEXT = [[0.3, -0.2]]
LOGP_CUR = [[0.1, 0.6]]
MC = [0.8]


def calibrated_gap(enabled=1.0, q_cur=Q_CUR):
    q_pi = cal_ql.calibrate(jnp.concatenate([jnp.array(Q_NEXT), jnp.array(q_cur)], -1), jnp.array(MC), enabled)
    gap, _ = cal_ql.cql_penalty(
        jnp.array(Q_DATA), jnp.array(Q_RAND), q_pi[..., :2], q_pi[..., 2:], jnp.array(LOGP_NEXT),
        jnp.array(LOGP_CUR), 1, 1.0, -jnp.inf, jnp.inf,
    )  # fmt: skip
    return gap


def lse(values):
    return math.log(sum(math.exp(v) for v in values))


def test_bound_lifts_only_policy_actions_below_the_mc_return():
    q = jnp.array([[[1.5, 0.7, 2.0, -1.0]], [[0.4, 0.9, 1.2, 0.6]]])
    np.testing.assert_allclose(cal_ql.calibrate(q, jnp.array(MC)), [[[1.5, 0.8, 2.0, 0.8]], [[0.8, 0.9, 1.2, 0.8]]])
    # In the penalty: policy terms below 0.8 become 0.8 before -log pi; uniform (0.2, -0.3, 0.0 < 0.8)
    # and data terms (0.3, 0.5 < 0.8) stay as they are.
    x1 = [0.2 + LOG2, -0.3 + LOG2, 1.5 - 0.3, 0.8 + 0.2, 2.0 - 0.1, 0.8 - 0.6]
    x2 = [0.0 + LOG2, 1.1 + LOG2, 0.8 - 0.3, 0.9 + 0.2, 1.2 - 0.1, 0.8 - 0.6]
    np.testing.assert_allclose(calibrated_gap(), [lse(x1) - 0.3, lse(x2) - 0.5], rtol=1e-5)
    # --no-calibrate: plain CQL
    y1 = [0.2 + LOG2, -0.3 + LOG2, 1.5 - 0.3, 0.7 + 0.2, 2.0 - 0.1, -1.0 - 0.6]
    y2 = [0.0 + LOG2, 1.1 + LOG2, 0.4 - 0.3, 0.9 + 0.2, 1.2 - 0.1, 0.6 - 0.6]
    np.testing.assert_allclose(calibrated_gap(0.0), [lse(y1) - 0.3, lse(y2) - 0.5], rtol=1e-5)


def test_bound_stops_the_push_down_only_where_q_is_below_the_bound():
    # d gap / d Q(s, a_cur): zero where Q < MC (the bound holds it), positive elsewhere.
    grad = jax.grad(lambda q: calibrated_gap(q_cur=q).sum())(jnp.array(Q_CUR))
    assert float(grad[0, 0, 1]) == 0.0 and float(grad[1, 0, 1]) == 0.0  # -1.0 and 0.6 < 0.8
    assert float(grad[0, 0, 0]) > 0 and float(grad[1, 0, 0]) > 0  # 2.0 and 1.2 > 0.8


# --- online batches ---------------------------------------------------------------------------
def test_mixed_batch_draws_offline_until_online_rows_exist():
    def rows(value, n):
        return cal_ql.Batch(*(jnp.full((n,) + s, value, jnp.float32) for s in [(3,), (2,), (), (3,), (), ()]))

    offline, online = rows(1.0, 50), rows(2.0, 40)
    online = online._replace(rewards=online.rewards.at[5:].set(-99.0))  # rows past n_online are never used
    batch = cal_ql.sample_mixed((offline, online, jnp.int32(0)), jax.random.key(0), 64, 0.5)
    assert batch.rewards.shape == (64,) and np.all(np.asarray(batch.rewards) == 1.0)
    batch = cal_ql.sample_mixed((offline, online, jnp.int32(5)), jax.random.key(0), 64, 0.5)
    np.testing.assert_array_equal(batch.rewards, [1.0] * 32 + [2.0] * 32)


# --- offline to online and the command line ---------------------------------------------------
# The short run: rewards unscaled (1000 / return range would multiply the pendulum's by 10), a faster
# actor than the dense preset's 3e-5, and gamma 0.9, so that the critic reaches the Monte-Carlo
# bound (<= 10) within the 1000 updates (with 0.99, MC returns up to 63 hold the bound active on
# every policy action for longer than that and the policy is still poor at 1000 updates).
OFFLINE_STEPS, ONLINE_STEPS = 1000, 200
TRAIN_FLAGS = dict(policy_lr=1e-3, normalize_rewards=False, discount=0.9)


@pytest.fixture(scope="module")
def o2o_run(pendulum_dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("calql")
    args = cal_ql.Args(dataset=pendulum_dataset, out_dir=str(out), seed=0, num_seeds=2,
                       total_steps=OFFLINE_STEPS, online_steps=ONLINE_STEPS, eval_every=OFFLINE_STEPS // 2,
                       **TRAIN_FLAGS, **TINY)  # fmt: skip
    return cal_ql.train(args)


def test_offline_phase_learns_and_beats_random(o2o_run, pendulum_dataset):
    from common.data import load_dataset

    _, meta = load_dataset(pendulum_dataset, to_device=False)
    final_offline = o2o_run["final_offline"]
    assert final_offline["step"] == OFFLINE_STEPS
    assert final_offline["normalized_mean"] >= 0.0 + 10  # ref_min_score is the random policy's return
    last_offline = [e for e in o2o_run["evaluations"] if e["phase"] == "offline"][-1]
    assert np.mean(last_offline["returns"]) >= 0.25 * meta.episode_returns.mean()


def test_offline_to_online_logs_both_phases(o2o_run):
    phases = [(e["phase"], e["step"]) for e in o2o_run["evaluations"]]
    assert phases == [("offline", OFFLINE_STEPS // 2), ("offline", OFFLINE_STEPS), ("online", ONLINE_STEPS)]
    assert o2o_run["final"]["step"] == ONLINE_STEPS and o2o_run["online_steps"] == ONLINE_STEPS
    assert np.isfinite(o2o_run["final"]["normalized_mean"]) and o2o_run["seeds"] == [0, 1]


# The shapes of the offline-to-online run's (seeds, sizes, chunks of updates, online buffer,
# evaluation batch), so that the subprocess finds its compiled programs in the persistent cache.
SMOKE_STEPS = OFFLINE_STEPS // 2


def test_cli_smoke(pendulum_dataset, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO)}  # MINARI_DATASETS_PATH comes from the conftest
    proc = subprocess.run(
        [sys.executable, str(REPO / "algorithms" / "cal_ql.py"), "--dataset", pendulum_dataset,
         "--total-steps", str(SMOKE_STEPS), "--online-steps", str(ONLINE_STEPS), "--eval-every",
         str(SMOKE_STEPS), "--num-seeds", "2", "--hidden-dims", "64", "64", "--batch-size", "64",
         "--eval-episodes", "5", "--out-dir", str(tmp_path)],
        capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.splitlines()[0].startswith("run directory: ")
    (run_dir,) = [p for p in (tmp_path / "cal_ql").iterdir() if p.is_dir()]
    record = json.loads((run_dir / "record.json").read_text())
    assert record["algorithm"] == "cal_ql" and record["tier"] == "short"
    phases = [(e["phase"], e["step"]) for e in record["evaluations"]]
    assert phases == [("offline", SMOKE_STEPS), ("online", ONLINE_STEPS)]
    assert record["final_offline"]["step"] == SMOKE_STEPS and record["final"]["step"] == ONLINE_STEPS
