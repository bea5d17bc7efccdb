"""CQL: the penalty against hand-computed values, its gradient, the Lagrange multiplier, learning,
the command line."""

import dataclasses
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
import cql  # noqa: E402

TINY = dict(hidden_dims=(64, 64), batch_size=64, eval_episodes=5, no_log=True)
# The short learning run: rewards unscaled (1000 / return range would multiply the pendulum's by 10)
# and a faster actor than the locomotion preset's 3e-5, so that 500 updates suffice (measured on
# seeds 0, 1, 2: returns 77, 38, 61 after 250 updates, 100 for all three after 500 and up to 1500).
TRAIN_STEPS = 500
TRAIN_FLAGS = dict(policy_lr=1e-3, normalize_rewards=False)
LOG2 = math.log(2.0)

# One state, two critics, N = 2 sampled actions per proposal, |A| = 1.
Q_DATA = [[1.0], [0.5]]
Q_RAND = [[[0.2, -0.3]], [[0.0, 0.1]]]
Q_NEXT = [[[1.5, 0.7]], [[0.4, 0.9]]]
Q_CUR = [[[2.0, 1.0]], [[1.2, -0.5]]]
LOGP_NEXT = [[0.3, -0.2]]
LOGP_CUR = [[0.1, 0.6]]


def lse(values, temp=1.0):
    return temp * math.log(sum(math.exp(v / temp) for v in values))


def penalty(importance_sample, temp=1.0, clip_min=-np.inf, clip_max=np.inf):
    gap, _ = cql.cql_penalty(
        *(jnp.array(x) for x in (Q_DATA, Q_RAND, Q_NEXT, Q_CUR, LOGP_NEXT, LOGP_CUR)), 1, jnp.float32(temp),
        jnp.float32(clip_min), jnp.float32(clip_max), importance_sample,
    )  # fmt: skip
    return np.asarray(gap)


# --- the CQL penalty --------------------------------------------------------------------------
@pytest.mark.parametrize("temp", [1.0, 2.0])
def test_penalty_with_importance_sampling_hand_computed(temp):
    # Uniform samples weighted by 1 / 0.5^|A| (+log 2), policy samples by 1 / pi (-log pi).
    x1 = [0.2 + LOG2, -0.3 + LOG2, 1.5 - 0.3, 0.7 + 0.2, 2.0 - 0.1, 1.0 - 0.6]
    x2 = [0.0 + LOG2, 0.1 + LOG2, 0.4 - 0.3, 0.9 + 0.2, 1.2 - 0.1, -0.5 - 0.6]
    expected = [lse(x1, temp) - 1.0, lse(x2, temp) - 0.5]
    np.testing.assert_allclose(penalty(True, temp), expected, rtol=1e-5)


def test_penalty_without_importance_sampling_hand_computed():
    # CQL(rho): plain logsumexp over uniform, data, pi(.|s') and pi(.|s) actions.
    expected = [
        lse([0.2, -0.3, 1.0, 1.5, 0.7, 2.0, 1.0]) - 1.0,
        lse([0.0, 0.1, 0.5, 0.4, 0.9, 1.2, -0.5]) - 0.5,
    ]
    np.testing.assert_allclose(penalty(False), expected, rtol=1e-5)


def test_penalty_is_clipped():
    full = penalty(True)
    np.testing.assert_allclose(penalty(True, clip_max=2.0), np.minimum(full, 2.0), rtol=1e-6)
    np.testing.assert_allclose(penalty(True, clip_min=5.0), [5.0, 5.0])


def test_q_multi_is_one_pass_equal_to_per_action_calls():
    critic = cql.Critics((16, 16))
    k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
    obs, actions = jax.random.normal(k1, (5, 3)), jax.random.uniform(k2, (5, 7, 2), minval=-1, maxval=1)
    params = jax.jit(critic.init)(k3, obs, actions[:, 0])
    q = jax.jit(lambda p: cql.q_multi(critic, p, obs, actions))(params)
    per_action = jax.jit(lambda p: jnp.stack([critic.apply(p, obs, actions[:, j]) for j in range(7)], -1))(params)
    assert q.shape == (2, 5, 7)
    np.testing.assert_allclose(q, per_action, rtol=1e-5, atol=1e-6)


def test_penalty_gradient_pushes_ood_q_down_relative_to_data():
    critic = cql.Critics((32, 32))
    k1, k2, k3, k4, k5 = jax.random.split(jax.random.key(1), 5)
    B, N = 32, 10
    obs = jax.random.normal(k1, (B, 3))
    a_data = jax.random.uniform(k2, (B, 1, 2), minval=-0.2, maxval=0.2)
    a_ood = jax.random.uniform(k3, (B, 3 * N, 2), minval=-1, maxval=1)  # rand, next, cur
    logp = jax.random.normal(k4, (B, N)) * 0.1
    params = jax.jit(critic.init)(k5, obs, a_data[:, 0])

    def gap_of(p):
        q = cql.q_multi(critic, p, obs, jnp.concatenate([a_data, a_ood], 1))
        gap, _ = cql.cql_penalty(q[..., 0], q[..., 1 : 1 + N], q[..., 1 + N : 1 + 2 * N], q[..., 1 + 2 * N :],
                                 logp, logp, 2, 1.0, -jnp.inf, jnp.inf)  # fmt: skip
        return gap.sum()

    def ood_minus_data(p):
        q = cql.q_multi(critic, p, obs, jnp.concatenate([a_data, a_ood], 1))
        return (q[..., 1:].mean(-1) - q[..., 0]).mean()

    measure = jax.jit(lambda p: (gap_of(p), ood_minus_data(p), jax.grad(gap_of)(p)))
    gap0, ood0, grads = measure(params)
    assert float(optax_global_norm(grads)) > 1e-3
    gap1, ood1, _ = measure(jax.tree_util.tree_map(lambda p, g: p - 0.05 * g, params, grads))
    assert gap1 < gap0
    assert ood1 < ood0 - 1e-3


def optax_global_norm(tree):
    return jnp.sqrt(sum(jnp.sum(x**2) for x in jax.tree_util.tree_leaves(tree)))


# --- the update -------------------------------------------------------------------------------
def tiny_agent(**kw):
    """A jitted update of a 32-32 agent (obs_dim 3, |A| = 2), its initial state and a fixed batch."""
    args = cql.resolve(cql.Args(hidden_dims=(32, 32), **kw), "locomotion")
    init, update, act = cql.make_agent(args, 3, 2)
    state = jax.jit(init)(jax.random.key(0), jnp.zeros(3), jnp.ones(3))
    k1, k2, k3 = jax.random.split(jax.random.key(1), 3)
    batch = cql.Batch(
        jax.random.normal(k1, (64, 3)), jax.random.uniform(k2, (64, 2), minval=-0.3, maxval=0.3),
        jnp.ones(64), jax.random.normal(k3, (64, 3)), jnp.ones(64),
    )  # fmt: skip
    return args, jax.jit(update), state, batch


@pytest.fixture(scope="module")
def agent():
    return tiny_agent(qf_lr=3e-3)


def test_update_with_cql_term_lowers_ood_q_relative_to_data(agent):
    args, update, state, batch = agent
    critic = cql.Critics(args.critic_hidden_dims)
    actions = jnp.concatenate([batch.actions[:, None], jax.random.uniform(jax.random.key(2), (64, 10, 2))], 1)

    q_of = jax.jit(lambda p: cql.q_multi(critic, p, batch.observations, actions))

    def ood_minus_data_after(cql_alpha):  # one compile: cql_alpha is an array in Hyper
        s, hp = state, cql.make_hyper(dataclasses.replace(args, cql_alpha=cql_alpha), 2)
        for i in range(20):
            s, metrics = update(s, batch, jax.random.key(10 + i), hp)
        assert all(np.isfinite(float(v)) for v in metrics.values())
        q = q_of(s.params["critic"])
        return float((q[..., 1:].mean(-1) - q[..., 0]).mean()), s

    gap_plain, _ = ood_minus_data_after(0.0)
    gap_cql, s_cql = ood_minus_data_after(10.0)
    # The penalty has a gradient inside the update and it points the right way (measured: +0.06 vs -0.05).
    assert gap_cql < gap_plain - 0.05
    for group in ("actor", "critic", "log_alpha"):
        delta = jax.tree_util.tree_map(lambda a, b: jnp.abs(a - b).max(), s_cql.params[group], state.params[group])
        assert max(jax.tree_util.tree_leaves(delta)) > 0
    # Without the Lagrange form its multiplier is left alone.
    assert float(s_cql.params["log_alpha_prime"]) == float(state.params["log_alpha_prime"])


@pytest.mark.parametrize("target_gap, rises", [(-1000.0, True), (1000.0, False)])
def test_lagrange_multiplier_rises_when_gap_exceeds_target(agent, target_gap, rises):
    # The dual loss alone: gradient descent on log alpha' raises it when the gap is above the target.
    gap = jnp.array([3.0, 2.0])
    grad = jax.grad(cql.lagrange_loss)(jnp.float32(1.0), gap, jnp.float32(5.0), jnp.float32(2.0 if rises else 3.0))
    assert (float(grad) < 0) == rises
    # Inside the update: one Adam step moves log alpha' up (gap above target) or down.
    args, update, state, batch = agent  # the same compiled update: the Lagrange switch is in Hyper
    hp = cql.make_hyper(dataclasses.replace(args, cql_lagrange=True, target_action_gap=target_gap), 2)
    new, metrics = update(state, batch, jax.random.key(3), hp)
    moved = float(new.params["log_alpha_prime"] - state.params["log_alpha_prime"])
    assert (moved > 0) == rises and abs(moved) > 1e-5
    assert float(metrics["alpha_prime"]) == pytest.approx(math.e, rel=1e-5)  # JaxCQL's log alpha' = 1 at init


def test_presets_resolve_and_flags_win():
    loco = cql.resolve(cql.Args(), "locomotion")
    assert (loco.cql_alpha, loco.policy_lr, loco.cql_lagrange, loco.max_target_backup) == (
        10.0,
        3e-5,
        False,
        False,
    )
    assert loco.critic_hidden_dims == (256, 256, 256) and loco.normalize_states
    maze = cql.resolve(cql.Args(hidden_dims=(64, 64)), "antmaze")
    assert maze.cql_lagrange and maze.target_action_gap == 0.8 and maze.max_target_backup
    assert (maze.reward_scale, maze.reward_bias, maze.cql_clip_diff_min) == (10.0, -5.0, -200.0)
    assert maze.critic_hidden_dims == (64, 64)  # --hidden-dims sizes every MLP
    assert cql.resolve(cql.Args(cql_alpha=1.0, critic_hidden_dims=(8,)), "antmaze").cql_alpha == 1.0


# --- learning and the command line -------------------------------------------------------------
def test_short_run_learns_and_beats_random(pendulum_dataset, tmp_path):
    from common.data import load_dataset

    _, meta = load_dataset(pendulum_dataset, to_device=False)
    args = cql.Args(dataset=pendulum_dataset, out_dir=str(tmp_path), seed=0, num_seeds=2,
                    total_steps=TRAIN_STEPS, eval_every=TRAIN_STEPS // 2, **TRAIN_FLAGS, **TINY)  # fmt: skip
    record = cql.train(args)
    final = record["final"]
    assert [(e["phase"], e["step"]) for e in record["evaluations"]] == [
        ("offline", TRAIN_STEPS // 2), ("offline", TRAIN_STEPS)
    ]  # fmt: skip
    assert record["seeds"] == [0, 1] and len(final["per_seed"]) == 2
    assert final["normalized_mean"] >= 0.0 + 10  # ref_min_score is the random policy's return
    assert np.mean(record["evaluations"][-1]["returns"]) >= 0.25 * meta.episode_returns.mean()


# The shapes of the learning run's (seeds, sizes, chunk of updates, evaluation batch), so that the
# subprocess finds its compiled programs in the test session's persistent compilation cache.
SMOKE_STEPS = TRAIN_STEPS // 2


def test_cli_smoke(pendulum_dataset, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO)}  # MINARI_DATASETS_PATH comes from the conftest
    proc = subprocess.run(
        [sys.executable, str(REPO / "algorithms" / "cql.py"), "--dataset", pendulum_dataset,
         "--total-steps", str(SMOKE_STEPS), "--eval-every", str(SMOKE_STEPS), "--num-seeds", "2",
         "--hidden-dims", "64", "64", "--batch-size", "64", "--eval-episodes", "5",
         "--out-dir", str(tmp_path)],
        capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.splitlines()[0].startswith("run directory: ")
    (run_dir,) = [p for p in (tmp_path / "cql").iterdir() if p.is_dir()]
    record = json.loads((run_dir / "record.json").read_text())
    assert record["algorithm"] == "cql" and record["total_steps"] == SMOKE_STEPS and record["tier"] == "short"
    assert [e["step"] for e in record["evaluations"]] == [SMOKE_STEPS] and record["seeds"] == [0, 1]
    config = json.loads((run_dir / "config.json").read_text())
    assert config["cql_alpha"] == 10.0 and config["critic_hidden_dims"] == [64, 64]  # preset + --hidden-dims
    assert (run_dir / "checkpoint.msgpack").exists() and list(run_dir.glob("events.out.tfevents*"))
