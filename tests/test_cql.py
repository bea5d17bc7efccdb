"""CQL: the penalty against hand-computed values, its gradient, each loss, the Lagrange multiplier,
the per-dataset presets, learning, the command line, --resume and a --sweep grid point."""

import dataclasses
import json
import math
import shutil
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import serialization
from helpers import assert_policy_reloads, only_run_dir, run_algorithm, snapshot  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "algorithms"))
import cql  # noqa: E402

TINY = dict(hidden_dims=(64, 64), batch_size=64, eval_episodes=5, no_log=True)
# The short learning run: a faster actor than the locomotion preset's 3e-5, so that 500 updates
# suffice (measured on seeds 0, 1, 2: returns 77, 38, 61 after 250 updates, 100 for all three after
# 500 and up to 1500). The pendulum's rewards stay as they are (the locomotion preset).
TRAIN_STEPS = 500
TRAIN_FLAGS = dict(policy_lr=1e-3)
LOG2 = math.log(2.0)


def meta_of(domain="locomotion", robot="pendulum", level="pd"):
    """What resolve() reads of a dataset's Meta."""
    return SimpleNamespace(domain=domain, robot=robot, level=level)


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
    assert float(global_norm(grads)) > 1e-3
    gap1, ood1, _ = measure(jax.tree_util.tree_map(lambda p, g: p - 0.05 * g, params, grads))
    assert gap1 < gap0
    assert ood1 < ood0 - 1e-3


def global_norm(tree):
    return jnp.sqrt(sum(jnp.sum(x**2) for x in jax.tree_util.tree_leaves(tree)))


# --- the losses -------------------------------------------------------------------------------
def hyper(**kw):
    return cql.make_hyper(cql.resolve(cql.Args(**kw), meta_of()), 2)


def test_temperature_loss_hand_computed_and_raises_alpha_when_entropy_is_low():
    # -log_alpha * mean(log pi + target_entropy), the target -|A| = -2 here.
    loss, info = cql.temperature_loss(jnp.float32(0.5), jnp.array([3.0, 2.0]), hyper())
    assert float(loss) == pytest.approx(-0.5 * ((3.0 - 2.0) + (2.0 - 2.0)) / 2)
    assert float(info["alpha_loss"]) == float(loss)
    # Entropy -log pi below the target: the gradient is negative, so descent raises alpha.
    grad = jax.grad(lambda la: cql.temperature_loss(la, jnp.array([4.0, 3.0]), hyper())[0])(jnp.float32(0.0))
    assert float(grad) == pytest.approx(-((4.0 - 2.0) + (3.0 - 2.0)) / 2)


def test_actor_loss_clones_the_data_during_bc_steps_then_maximizes_q():
    actor, critic = cql.Actor((32, 32), 2), cql.Critics((32, 32))
    k1, k2, k3, k4 = jax.random.split(jax.random.key(4), 4)
    obs = jax.random.normal(k1, (64, 3))
    batch = cql.Batch(obs, jnp.full((64, 2), 0.6), jnp.zeros(64), obs, jnp.ones(64))
    noise = jax.random.normal(k4, (64, 10, 2))
    hp = hyper(bc_steps=100)

    @jax.jit
    def measure(k_actor, k_critic):
        actor_params, critic_params = actor.init(k_actor, obs), critic.init(k_critic, obs, batch.actions)

        def data_log_prob(p):
            mean, log_std = actor.apply(p, obs)
            return cql.tanh_gaussian_log_prob(mean, log_std, jnp.arctanh(batch.actions)).mean()

        def gain(update):  # change of log pi(a_data|s) after one gradient step on actor_loss
            loss = lambda p: cql.actor_loss(p, actor, critic, critic_params, batch, noise, 0.0, update, hp)[0]  # noqa: E731
            stepped = jax.tree_util.tree_map(lambda x, g: x - 0.01 * g, actor_params, jax.grad(loss)(actor_params))
            return data_log_prob(stepped) - data_log_prob(actor_params)

        loss, info = cql.actor_loss(actor_params, actor, critic, critic_params, batch, noise, 0.0, 100, hp)
        mean, log_std = actor.apply(actor_params, obs)
        a = jnp.tanh(mean + jnp.exp(log_std) * noise[:, 0])  # the first draw of the noise
        return gain(0), gain(100), loss, -critic.apply(critic_params, obs, a).min(0).mean(), info

    bc_gain, q_gain, loss, expected, info = measure(k2, k3)  # update 100 is the first past bc_steps
    assert float(bc_gain) > 0.01 and float(bc_gain) > 10 * abs(float(q_gain))
    assert float(loss) == pytest.approx(float(expected), rel=1e-5)  # alpha 0: -min Q(s, a~)
    assert set(info) == {"actor_loss", "entropy"}


def tiny_agent(**kw):
    """A jitted update of a 32-32 agent (obs_dim 3, |A| = 2), its initial state and a fixed batch."""
    args = cql.resolve(cql.Args(hidden_dims=(32, 32), **kw), meta_of())
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
    # Without the Lagrange form its multiplier is left alone; the update counter counts.
    assert float(s_cql.params["log_alpha_prime"]) == float(state.params["log_alpha_prime"])
    assert int(s_cql.step) == 20


@pytest.mark.parametrize("target_gap, rises", [(-1000.0, True), (1000.0, False)])
def test_lagrange_multiplier_rises_when_gap_exceeds_target(agent, target_gap, rises):
    # The dual loss alone: gradient descent on log alpha' raises it when the gap is above the target.
    gap = jnp.array([3.0, 2.0])
    hp = hyper(cql_lagrange=True, cql_alpha=5.0, target_action_gap=2.0 if rises else 3.0)
    grad = jax.grad(lambda x: cql.lagrange_loss(x, gap, hp)[0])(jnp.float32(1.0))
    assert (float(grad) < 0) == rises
    assert float(grad) == pytest.approx(-math.e * 5.0 * (2.5 - (2.0 if rises else 3.0)), rel=1e-5)
    off = jax.grad(lambda x: cql.lagrange_loss(x, gap, hyper(cql_lagrange=False))[0])(jnp.float32(1.0))
    assert float(off) == 0.0  # without the Lagrange form the dual loss is zero
    # Inside the update: one Adam step moves log alpha' up (gap above target) or down.
    args, update, state, batch = agent  # the same compiled update: the Lagrange switch is in Hyper
    hp = cql.make_hyper(dataclasses.replace(args, cql_lagrange=True, target_action_gap=target_gap), 2)
    new, metrics = update(state, batch, jax.random.key(3), hp)
    moved = float(new.params["log_alpha_prime"] - state.params["log_alpha_prime"])
    assert (moved > 0) == rises and abs(moved) > 1e-5
    assert float(metrics["alpha_prime"]) == pytest.approx(math.e, rel=1e-5)  # JaxCQL's log alpha' = 1 at init


# --- presets ----------------------------------------------------------------------------------
def test_presets_per_dataset_and_flags_win():
    def resolved(robot, level, domain="locomotion", **flags):
        return cql.resolve(cql.Args(**flags), meta_of(domain, robot, level))

    # CORL normalizes rewards on hopper-medium only among the locomotion sets.
    hopper = resolved("hopper", "medium")
    assert hopper.normalize_rewards and hopper.normalize_states
    assert (hopper.cql_alpha, hopper.policy_lr, hopper.cql_lagrange) == (10.0, 3e-5, False)
    assert not hopper.max_target_backup
    assert hopper.critic_hidden_dims == (256, 256, 256) and hopper.eval_episodes == 10
    for robot, level in [("walker2d", "medium"), ("hopper", "medium-replay"), ("halfcheetah", "medium")]:
        assert not resolved(robot, level).normalize_rewards, (robot, level)
    assert not resolved("hopper", "medium", normalize_rewards=False).normalize_rewards  # a flag always wins
    assert resolved("walker2d", "medium", normalize_rewards=True).normalize_rewards
    assert resolved("hopper", "medium", eval_episodes=3).eval_episodes == 3

    maze = resolved("antmaze", "umaze", "antmaze", hidden_dims=(64, 64))
    assert maze.cql_lagrange and maze.target_action_gap == 0.8 and maze.max_target_backup
    assert (maze.reward_scale, maze.reward_bias, maze.cql_clip_diff_min) == (10.0, -5.0, -200.0)
    assert maze.critic_hidden_dims == (64, 64) and maze.eval_episodes == 100  # --hidden-dims sizes every MLP
    assert resolved("antmaze", "umaze", "antmaze", cql_alpha=1.0, critic_hidden_dims=(8,)).cql_alpha == 1.0
    point = resolved("pointmaze", "umaze-sparse", "pointmaze")  # CORL's maze2d
    assert (point.cql_lagrange, point.target_action_gap, point.cql_alpha) == (True, 5.0, 10.0)
    assert not point.max_target_backup
    assert point.normalize_states and not point.normalize_rewards and point.reward_scale == 1.0
    door = resolved("door", "human", "adroit")
    assert (door.cql_alpha, door.policy_lr, door.cql_lagrange) == (1.0, 1e-4, False)


@pytest.mark.parametrize(
    "flags, named",
    [(dict(cql_n_actions=0), "--cql-n-actions"), (dict(discount=1.0), "--discount"),
     (dict(policy_lr=0.0), "--policy-lr")],
)  # fmt: skip
def test_bad_flags_are_refused_with_the_flag_named(flags, named):
    from common.data import UserError

    cql.validate(cql.Args())  # the defaults pass
    with pytest.raises(UserError, match=named):
        cql.validate(cql.Args(**flags))


# --- learning, the command line and --resume ---------------------------------------------------
@pytest.fixture(scope="module")
def learned(pendulum_dataset, tmp_path_factory):
    args = cql.Args(dataset=pendulum_dataset, out_dir=str(tmp_path_factory.mktemp("cql")), seed=0, num_seeds=2,
                    total_steps=TRAIN_STEPS, eval_every=TRAIN_STEPS // 2, **TRAIN_FLAGS, **TINY)  # fmt: skip
    return cql.train(args)


def test_short_run_learns_and_beats_random(learned, pendulum_dataset):
    from common.data import load_dataset

    _, meta = load_dataset(pendulum_dataset, to_device=False)
    final = learned["final"]
    assert [(e["phase"], e["step"]) for e in learned["evaluations"]] == [
        ("offline", TRAIN_STEPS // 2), ("offline", TRAIN_STEPS)
    ]  # fmt: skip
    assert learned["seeds"] == [0, 1] and len(final["per_seed"]) == 2
    assert final["normalized_mean"] >= 0.0 + 10  # ref_min_score is the random policy's return
    assert np.mean(learned["evaluations"][-1]["returns"]) >= 0.25 * meta.episode_returns.mean()


# The learning run's shapes (seeds, sizes, chunk of updates, evaluation batch), so that the
# subprocesses find its compiled programs in the test session's persistent compilation cache, and
# its first half, so that a resumed command line run can be compared with it.
SMOKE_STEPS = TRAIN_STEPS // 2
CLI_FLAGS = ["--total-steps", SMOKE_STEPS, "--eval-every", SMOKE_STEPS, "--num-seeds", 2, "--hidden-dims", 64, 64,
             "--batch-size", 64, "--eval-episodes", 5, "--policy-lr", 1e-3]  # fmt: skip


def run_cli(*flags, cwd):
    return run_algorithm("cql", *flags, cwd=cwd)


files_of = snapshot


@pytest.fixture(scope="module")
def cli_run(pendulum_dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("cql_cli")
    proc = run_cli("--dataset", pendulum_dataset, *CLI_FLAGS, "--out-dir", out, cwd=out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run_dir,) = [p for p in (out / "cql").iterdir() if p.is_dir()]
    return proc, run_dir


def test_cli_smoke(cli_run):
    proc, run_dir = cli_run
    assert proc.stdout.splitlines()[0] == f"run directory: {run_dir}"
    assert "normalize_rewards False" in proc.stdout  # the resolved preset is printed
    record = json.loads((run_dir / "record.json").read_text())
    assert record["algorithm"] == "cql" and record["total_steps"] == SMOKE_STEPS and record["tier"] == "short"
    assert [e["step"] for e in record["evaluations"]] == [SMOKE_STEPS] and record["seeds"] == [0, 1]
    config = json.loads((run_dir / "config.json").read_text())
    assert config["cql_alpha"] == 10.0 and config["critic_hidden_dims"] == [64, 64]  # preset + --hidden-dims
    assert config["normalize_rewards"] is False and config["eval_episodes"] == 5
    assert (run_dir / "checkpoint.msgpack").exists() and list(run_dir.glob("events.out.tfevents*"))


def test_resume_alone_continues_from_the_runs_config_as_if_uninterrupted(cli_run, learned, pendulum_dataset, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(cli_run[1], run_dir)
    # No --dataset (the default is hopper-medium) and no sizes: they come from the run's config.json.
    proc = run_cli("--resume", run_dir, "--total-steps", TRAIN_STEPS, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resumed from step 250" in proc.stdout
    record = json.loads((run_dir / "record.json").read_text())
    assert record["dataset"] == pendulum_dataset and record["total_steps"] == TRAIN_STEPS and record["finished"]
    assert json.loads((run_dir / "config.json").read_text())["hidden_dims"] == [64, 64]
    # The same two seeds and flags as the in-process learning run: the same evaluations, number for number.
    assert [(e["step"], e["returns"]) for e in record["evaluations"]] == [
        (e["step"], e["returns"]) for e in learned["evaluations"]
    ]


def test_resume_with_a_different_flag_is_refused_before_loading(cli_run, tmp_path):
    _, run_dir = cli_run
    before = files_of(run_dir)
    t0 = time.time()
    proc = run_cli("--resume", run_dir, "--hidden-dims", 32, 32, cwd=tmp_path)
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "--hidden-dims" in lines[0] and "64" in lines[0] and "Traceback" not in proc.stderr
    assert "run directory" not in proc.stdout and time.time() - t0 < 60  # refused before the dataset loads
    assert files_of(run_dir) == before and sorted(p.name for p in run_dir.parent.iterdir()) == [run_dir.name]


def test_finished_run_resumed_without_a_larger_budget_changes_nothing(cli_run, tmp_path):
    _, run_dir = cli_run
    before = files_of(run_dir)
    proc = run_cli("--resume", run_dir, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "finished" in proc.stdout
    assert files_of(run_dir) == before


def test_policy_reloads_from_the_run_directory(cli_run):
    """`load_policy` (what --eval-only uses) rebuilds the policy and reproduces the last evaluation."""
    assert_policy_reloads(cli_run[1])


def checkpoint_leaves(out: Path) -> list:
    """The state leaves of the one run's checkpoint under `out`, as saved (member axis first)."""
    raw = (only_run_dir(out, "cql") / "checkpoint.msgpack").read_bytes()
    return jax.tree_util.tree_leaves(serialization.msgpack_restore(raw)["state"])


def test_sweep_grid_point_equals_the_plain_run_with_its_value(pendulum_dataset, tmp_path):
    """--sweep cql_alpha=1,5 (the member axis, common/members.py) with one seed: point 1's member ends
    as seed 0 of the plain run with cql_alpha 5 does, point 0's elsewhere (its own traced alpha). Both
    runs have the learning run's shapes (two members, chunks of SMOKE_STEPS): its compiled programs."""
    flags = dict(dataset=pendulum_dataset, total_steps=SMOKE_STEPS, eval_every=SMOKE_STEPS, **TINY)
    record = cql.train(cql.Args(out_dir=str(tmp_path / "sweep"), num_seeds=1, sweep=("cql_alpha=1,5",), **flags))
    cql.train(cql.Args(out_dir=str(tmp_path / "plain"), num_seeds=2, cql_alpha=5.0, **flags))
    swept, alone = checkpoint_leaves(tmp_path / "sweep"), checkpoint_leaves(tmp_path / "plain")
    for a, b in zip(swept, alone):
        np.testing.assert_allclose(np.asarray(a)[1], np.asarray(b)[0], atol=2e-4, rtol=2e-3)
    assert not all(np.allclose(a[0], a[1]) for a in swept)  # point 0 trained with its own alpha
    assert [p["point"] for p in record["final_per_point"]] == [{"cql_alpha": 1.0}, {"cql_alpha": 5.0}]
    assert np.shape(record["evaluations"][-1]["normalized"]) == (2, 5)  # (members, episodes)
