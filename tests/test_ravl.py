"""RAVL: the dynamics ensemble fits a known linear system, EDAC's diversity term against hand-computed
values, the termination rules against Gymnasium's, rollouts that add nothing after a terminal step,
the FIFO model buffer and the dataset/model mix of a batch, the simulator stepped from observations,
and the command line: a run end to end, resume equal to an uninterrupted run on a reused model, a
--sweep point equal to the plain run with its value, and a bad --dynamics-path."""

import json
import sys
from pathlib import Path
from types import SimpleNamespace

import gymnasium as gym
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import serialization
from helpers import assert_policy_reloads, die_after_writes, only_run_dir, run_algorithm

from common.data import UserError

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "algorithms"))
import ravl  # noqa: E402

TINY = dict(hidden_dims=(32, 32), batch_size=64, eval_episodes=2, no_log=True, num_critics=3, updates_per_epoch=25,
            rollouts_per_epoch=100, model_hidden_dims=(32, 32), model_max_epochs=3)  # fmt: skip
TINY_FLAGS = ["--hidden-dims", "32", "32", "--batch-size", "64", "--eval-episodes", "2", "--no-log", "--num-critics",
              "3", "--updates-per-epoch", "25", "--rollouts-per-epoch", "100", "--model-hidden-dims", "32", "32",
              "--model-max-epochs", "3"]  # fmt: skip


def tiny_args(dataset, out, **kw):
    return ravl.Args(dataset=dataset, out_dir=str(out), **{**TINY, **kw})


def quiet(*args, **kwargs):
    pass


# --- the dynamics model -------------------------------------------------------------------------
def test_dynamics_ensemble_fits_a_linear_system():
    """s' - s = s A + a B, r = s c (plus noise of std 0.01): the elites' holdout MSE is a small
    fraction of the targets' variance, and a model step lands near the true next state."""
    rng = np.random.default_rng(0)
    n, obs_dim, action_dim = 2000, 3, 2
    a_mat, b_mat = rng.normal(size=(obs_dim, obs_dim)) * 0.3, rng.normal(size=(action_dim, obs_dim))
    c = rng.normal(size=obs_dim)
    s, a = rng.normal(size=(n, obs_dim)), rng.uniform(-1, 1, (n, action_dim))
    delta, r = s @ a_mat + a @ b_mat + 0.01 * rng.normal(size=(n, obs_dim)), s @ c + 0.01 * rng.normal(size=n)
    data = ravl.Transitions(*(jnp.asarray(x, jnp.float32) for x in (s, a, r, s + delta, np.ones(n))))
    args = ravl.Args(num_models=3, num_elites=2, model_hidden_dims=(32, 32), model_max_epochs=60, model_min_epochs=60)
    dynamics, info = ravl.train_dynamics(args, data, jax.random.key(0), log=quiet)
    variance = np.concatenate([delta, r[:, None]], 1).var(0).mean()
    elite_mse = [info["holdout_mse"][e] for e in info["elites"]]
    assert elite_mse == sorted(elite_mse) and len(info["elites"]) == 2
    assert max(elite_mse) < 0.005 * variance, (elite_mse, variance)  # measured: 3e-4 of it
    member = ravl.DynamicsMember((32, 32), obs_dim + 1)
    next_obs, reward, done = ravl.model_step(member, dynamics, data.observations[:500], data.actions[:500],
                                             jax.random.key(1), ravl.never_done)  # fmt: skip
    err = np.concatenate([np.asarray(next_obs) - (s + delta)[:500], (np.asarray(reward) - r[:500])[:, None]], 1)
    assert (err**2).mean() < 0.01 * variance and not np.asarray(done).any()  # measured: 1e-3 of it
    # Each member has its own init and bootstrap: the ensemble is not one network three times.
    kernels = np.asarray(dynamics.members["params"]["hidden_0"]["kernel"])
    assert kernels.shape[0] == 3 and not np.allclose(kernels[0], kernels[1])


# --- EDAC's diversity term ----------------------------------------------------------------------
diversity = jax.jit(ravl.edac_diversity, static_argnums=0)  # one compile per critic function and shape


def test_edac_diversity_hand_computed():
    obs = jnp.zeros((4, 3))
    actions = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (4, 2)), jnp.float32)
    # Linear critics Q_i(s, a) = w_i . a: grad_a Q_i = w_i everywhere. Unit gradients (1, 0) and
    # (1, 1)/sqrt 2: <g_1, g_2> = 1/sqrt 2, counted twice (i != j), divided by N - 1 = 1.
    linear = lambda w, o, a: a @ w  # noqa: E731
    w = jnp.array([[1.0, 0.0], [2.0, 2.0]])
    np.testing.assert_allclose(diversity(linear, w, obs, actions), np.sqrt(2), rtol=1e-5)
    # A third critic (0, 3): pairs 1/sqrt 2, 0, 1/sqrt 2, each counted twice, divided by N - 1 = 2.
    w3 = jnp.array([[1.0, 0.0], [2.0, 2.0], [0.0, 3.0]])
    np.testing.assert_allclose(diversity(linear, w3, obs, actions), np.sqrt(2), rtol=1e-5)
    w3 = w3.at[2].set(jnp.array([0.0, -3.0]))  # pairs 1/sqrt 2, 0, -1/sqrt 2: they cancel
    np.testing.assert_allclose(diversity(linear, w3, obs, actions), 0.0, atol=1e-6)
    # Action-dependent gradients: Q_1 = a_0^2 (grad (2 a_0, 0)), Q_2 = a_0 a_1 (grad (a_1, a_0)).
    # At a = (1, 1): cos 45 deg; at a = (1, -1): cos 135 deg; at a = (1, 0): 0.
    quad = lambda p, o, a: p[0] * a[:, 0] ** 2 + p[1] * a[:, 0] * a[:, 1]  # noqa: E731
    p = jnp.eye(2)
    for a, expected in [((1.0, 1.0), np.sqrt(2)), ((1.0, -1.0), -np.sqrt(2)), ((1.0, 0.0), 0.0)]:
        value = diversity(quad, p, obs[:1], jnp.array([a]))
        np.testing.assert_allclose(value, expected, atol=1e-6)
    # It trains the critics: a gradient in their parameters (second order), which turns them apart.
    grads = jax.jit(jax.grad(lambda w: ravl.edac_diversity(linear, w, obs, actions)))(w)
    assert np.isfinite(np.asarray(grads)).all() and float(jnp.abs(grads).max()) > 0.1
    assert float(diversity(linear, w - 0.1 * grads, obs, actions)) < np.sqrt(2)


def test_critic_init_is_the_official_vectorized_linear():
    """The official critic stores weights as (in, out), so PyTorch's init takes fan_in from the output
    width: every hidden layer, the first included, starts in U(+-1/sqrt(256)), biases 0.1."""
    params = ravl.Critic((256, 256, 256)).init(jax.random.key(0), jnp.zeros((1, 11)), jnp.zeros((1, 3)))["params"]
    for name in ("Dense_0", "Dense_1", "Dense_2"):
        kernel = np.asarray(params[name]["kernel"])
        assert 0.99 / 16 < np.abs(kernel).max() <= 1 / 16, name  # hopper's 14 inputs would give 1/sqrt(14)
        assert np.abs(kernel).mean() == pytest.approx(1 / 32, rel=0.02), name  # uniform: mean |w| = bound / 2
        np.testing.assert_array_equal(params[name]["bias"], np.float32(0.1))
    assert np.abs(np.asarray(params["Dense_3"]["kernel"])).max() <= 3e-3


def test_critic_loss_adds_eta_times_the_diversity():
    args = ravl.Args(hidden_dims=(16, 16), num_critics=3, eta=1.0)
    init, _, _, _, losses = ravl.make_agent(args, 3, 2)
    state = jax.jit(init)(jax.random.key(0))
    rng = np.random.default_rng(1)
    batch = ravl.Transitions(*(jnp.asarray(x, jnp.float32) for x in (
        rng.normal(size=(32, 3)), rng.uniform(-1, 1, (32, 2)), rng.normal(size=32), rng.normal(size=(32, 3)),
        np.ones(32))))  # fmt: skip
    hp = lambda eta: ravl.Hyper(*(jnp.float32(x) for x in (eta, 0.99, 0.005, -2.0)))  # noqa: E731
    target = jnp.zeros(32)
    critic_loss = jax.jit(losses["critic_loss"])
    with_term, m = critic_loss(state.critic, batch, target, hp(2.0))
    without, _ = critic_loss(state.critic, batch, target, hp(0.0))
    np.testing.assert_allclose(with_term - without, 2.0 * m["diversity"], rtol=1e-4)
    assert abs(float(m["diversity"])) > 1e-3
    # eta 0 (the claim experiment's critics): the term is not built at all.
    plain = ravl.make_agent(ravl.Args(hidden_dims=(16, 16), num_critics=3, eta=0.0), 3, 2)[4]["critic_loss"]
    loss, m0 = jax.jit(plain)(state.critic, batch, target, hp(0.0))
    assert "diversity" not in m0 and float(loss) == pytest.approx(float(without), rel=1e-6)


# --- termination ----------------------------------------------------------------------------------
def test_termination_rules_on_hand_built_states():
    hopper = np.zeros((6, 11), np.float32)
    hopper[:, 0] = 1.25
    hopper[1, 0], hopper[2, 1], hopper[3, 1], hopper[4, 6], hopper[5, 3] = 0.69, 0.21, -0.21, 150.0, np.nan
    assert np.asarray(ravl.hopper_done(jnp.asarray(hopper))).tolist() == [False, True, True, True, True, True]
    walker = np.zeros((6, 17), np.float32)
    walker[:, 0], walker[:, 1] = 1.2, 0.5
    walker[1, 0], walker[2, 0], walker[3, 1], walker[4, 1], walker[5, 0] = 0.79, 2.01, 1.01, -1.01, np.nan
    assert np.asarray(ravl.walker2d_done(jnp.asarray(walker))).tolist() == [False, True, True, True, True, True]
    wild = jnp.asarray(np.random.default_rng(0).normal(size=(5, 17)) * 1e3)
    assert not np.asarray(ravl.never_done(wild)).any()
    pendulum = jnp.array([[0.5, 0.1, 3.0, 3.0], [0.0, 0.21, 0.0, 0.0], [0.0, -0.21, 0.0, 0.0]])
    assert np.asarray(ravl.inverted_pendulum_done(pendulum)).tolist() == [False, True, True]
    names = {i: ravl.termination_of(SimpleNamespace(env_spec=SimpleNamespace(id=i)))[0] for i in
             ["Hopper-v5", "Walker2d-v5", "HalfCheetah-v5", "InvertedPendulum-v5", "AntMaze_UMaze-v4"]}  # fmt: skip
    assert names["Hopper-v5"] is ravl.hopper_done and names["Walker2d-v5"] is ravl.walker2d_done
    assert names["HalfCheetah-v5"] is ravl.never_done and names["AntMaze_UMaze-v4"] is ravl.never_done
    assert names["InvertedPendulum-v5"] is ravl.inverted_pendulum_done


@pytest.mark.parametrize("env_id, done_fn", [("Hopper-v5", ravl.hopper_done), ("Walker2d-v5", ravl.walker2d_done)])
def test_termination_rules_agree_with_gymnasium(env_id, done_fn):
    """Random observations around the healthy ranges: the rule says done exactly where the env's
    own is_healthy (v5, terminate_when_unhealthy) says unhealthy."""
    env = gym.make(env_id)
    u = env.unwrapped
    env.reset(seed=0)
    rng = np.random.default_rng(0)
    obs = rng.normal(scale=0.3, size=(400, env.observation_space.shape[0]))
    obs[:, 0] = rng.uniform(0.4, 2.3, 400)
    obs[:, 1] = rng.uniform(-1.3, 1.3, 400) if env_id.startswith("Walker") else rng.uniform(-0.35, 0.35, 400)
    nq = u.model.nq
    unhealthy = []
    for o in obs:
        u.set_state(np.concatenate([[0.0], o[: nq - 1]]), o[nq - 1 :])
        unhealthy.append(not u.is_healthy)
    env.close()
    assert 50 < sum(unhealthy) < 350  # both sides of the ranges are covered
    assert np.asarray(done_fn(jnp.asarray(obs, jnp.float32))).tolist() == unhealthy


# --- rollouts, the model buffer, the batch mix ------------------------------------------------------
def falling_rollouts():
    """Hopper-shaped rollouts whose height drops by 0.1 a step from 1.05, 0.95, 0.85, 0.75, 0.65:
    each terminates once its next height is below 0.7 (after 4, 3, 2, 1, 1 steps)."""
    start = jnp.zeros((5, 11)).at[:, 0].set(jnp.array([1.05, 0.95, 0.85, 0.75, 0.65]))
    policy = lambda obs, key: jnp.zeros((obs.shape[0], 3))  # noqa: E731

    def step(obs, actions, key):
        next_obs = obs.at[:, 0].add(-0.1)
        return next_obs, jnp.ones(obs.shape[0]), ravl.hopper_done(next_obs)

    return jax.jit(lambda key: ravl.generate_rollouts(policy, step, start, key, 5))(jax.random.key(0))


EXPECTED_HEIGHTS = [1.05, 0.95, 0.85, 0.75, 0.65, 0.95, 0.85, 0.75, 0.85, 0.75, 0.75]  # step by step
EXPECTED_MASKS = [1, 1, 1, 0, 0, 1, 1, 0, 1, 0, 0]


def test_rollouts_add_nothing_after_a_termination():
    transitions, valid = falling_rollouts()
    assert np.asarray(valid).sum(1).tolist() == [5, 3, 2, 1, 0]
    add = jax.jit(ravl.buffer_add)
    buffer = add(ravl.empty_buffer(30, 11, 3), transitions, valid)
    assert (int(buffer.size), int(buffer.ptr)) == (11, 11)
    np.testing.assert_allclose(buffer.data.observations[:11, 0], EXPECTED_HEIGHTS, atol=1e-5)
    assert np.asarray(buffer.data.masks[:11]).tolist() == EXPECTED_MASKS
    assert not np.asarray(buffer.data.rewards[11:]).any()  # the masked steps wrote nothing
    # FIFO: a second round into a buffer of 15 wraps around and overwrites the oldest rows.
    small = ravl.empty_buffer(15, 11, 3)
    small = add(add(small, transitions, valid), transitions, valid)
    assert (int(small.size), int(small.ptr)) == (15, 7)
    h = EXPECTED_HEIGHTS  # rows 0-10 first, then 11-14 and 0-6 again: the first round's rows 7-10 survive
    np.testing.assert_allclose(small.data.observations[:, 0], h[4:] + h[7:] + h[:4], atol=1e-5)


@pytest.mark.parametrize("ratio, batch_size, real_rows", [(0.05, 256, 12), (0.5, 64, 32), (0.0, 32, 0)])
def test_batches_mix_dataset_and_model_rows_at_the_ratio(ratio, batch_size, real_rows):
    data = ravl.Transitions(*(jnp.full((100, *s), v, jnp.float32) for s, v in
                              [((3,), 0.0), ((2,), 0.0), ((), 1.0), ((3,), 0.0), ((), 1.0)]))  # fmt: skip
    buffer = ravl.empty_buffer(100, 3, 2)
    buffer = buffer._replace(data=buffer.data._replace(rewards=buffer.data.rewards.at[:40].set(-1.0)),
                             size=jnp.int32(40), ptr=jnp.int32(40))  # fmt: skip
    n_real = int(ratio * batch_size)
    sample = jax.jit(ravl.sample_mixed, static_argnums=(3, 4))
    for seed in range(3):
        batch = sample(data, buffer, jax.random.key(seed), n_real, batch_size - n_real)
        rewards = np.asarray(batch.rewards)
        assert (rewards == 1).sum() == real_rows and (rewards == -1).sum() == batch_size - real_rows


# --- the simulator ----------------------------------------------------------------------------------
@pytest.mark.parametrize("env_id", ["Hopper-v5", "InvertedPendulum-v5"])
def test_simulator_steps_from_observations_like_the_env(env_id):
    """Set from an observation (x position 0), one step gives the env's own next observation, reward
    and termination."""
    env = gym.make(env_id)
    meta = SimpleNamespace(make_env=lambda: gym.make(env_id), env_spec=env.spec, obs_dim=env.observation_space.shape[0],
                           to_env_action=lambda a: np.asarray(a, np.float64))  # fmt: skip
    sim = ravl.Simulator(meta)
    obs, _ = env.reset(seed=3)
    env.action_space.seed(3)
    for _ in range(30):
        action = env.action_space.sample()
        next_obs, reward, term, trunc, _ = env.step(action)
        sim_obs, sim_reward, sim_term, _ = sim.step(*sim.state_of(obs), action)
        np.testing.assert_allclose(sim_obs, next_obs, atol=1e-6)
        assert sim_reward == pytest.approx(reward, abs=1e-6) and sim_term == term
        if term or trunc:
            break
        obs = next_obs
    env.close()
    ant = gym.make("Ant-v5")
    with pytest.raises(UserError, match="--true-dynamics needs"):
        ravl.Simulator(SimpleNamespace(make_env=lambda: ant, env_spec=ant.spec, obs_dim=105))


# --- the command line ----------------------------------------------------------------------------------
def test_cli_end_to_end(pendulum_dataset, tmp_path):
    flags = ["--dataset", pendulum_dataset, "--total-steps", "300", "--eval-every", "150", *TINY_FLAGS]
    proc = run_algorithm("ravl", *flags, "--out-dir", tmp_path, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_dir = only_run_dir(tmp_path, "ravl")
    record = json.loads((run_dir / "record.json").read_text())
    assert record["finished"] and record["command"][0] == "algorithms/ravl.py" and record["tier"] == "short"
    assert [e["step"] for e in record["evaluations"]] == [150, 300]
    assert record["dynamics"]["source"] == "trained" and len(record["dynamics"]["elites"]) == 5
    assert (run_dir / "dynamics.msgpack").exists() and "termination invertedpendulum" in proc.stdout
    buffers = [e["model_buffer"] for e in record["evaluations"]]
    # Six rounds of 100 rollouts by step 150, each 1 to 5 transitions long, into a buffer of 2500.
    assert 600 <= buffers[0]["size"][0] <= 2500 and buffers[1]["size"][0] >= buffers[0]["size"][0]
    assert 0 < buffers[1]["terminal_fraction"][0] < 1
    # What the run spent where: rounds and chunks after their first (compiling) call, per evaluation.
    timing = [e["timing"] for e in record["evaluations"]]
    assert [t["rollout_rounds"] for t in timing] == [5, 6] and [t["updates"] for t in timing] == [125, 150]
    assert all(t["model_steps_per_s"] > 0 and t["updates_per_s"] > 0 for t in timing)
    assert 0 < timing[1]["kept_transitions_per_s"] <= timing[1]["model_steps_per_s"]
    q = record["evaluations"][-1]["q_mean"]  # the critics' mean values since the previous evaluation
    assert len(q["data"]) == len(q["policy"]) == 1 and all(np.isfinite(q["data"] + q["policy"]))
    assert_policy_reloads(run_dir)  # load_policy, what --eval-only uses


SCHEDULE = dict(eval_every=25, updates_per_epoch=50)  # chunks of 25 updates, as TINY's epochs give elsewhere


def test_resume_equals_uninterrupted_run_on_a_reused_model(pendulum_dataset, tmp_path):
    """Evaluations every 25 updates, epochs of 50: the cut at 75 falls inside an epoch, so the resumed
    run continues on the checkpoint's model buffer. The cut run reuses the uninterrupted run's model
    through --dynamics-path."""
    ref = ravl.train(tiny_args(pendulum_dataset, tmp_path / "ref", total_steps=100, **SCHEDULE))
    model = only_run_dir(tmp_path / "ref", "ravl") / "dynamics.msgpack"
    flags = dict(**SCHEDULE, dynamics_path=str(model))
    ravl.train(tiny_args(pendulum_dataset, tmp_path / "cut", total_steps=75, **flags))
    run_dir = only_run_dir(tmp_path / "cut", "ravl")
    resumed = ravl.train(tiny_args(pendulum_dataset, tmp_path / "cut", total_steps=100, resume=str(run_dir), **flags))
    strip = lambda r: [(e["step"], e["returns"], e["model_buffer"]) for e in r["evaluations"]]  # noqa: E731
    assert strip(resumed) == strip(ref) and len(ref["evaluations"]) == 4
    sizes = [e["model_buffer"]["size"][0] for e in ref["evaluations"]]
    assert sizes[0] == sizes[1] < sizes[2] == sizes[3]  # rollouts at updates 0 and 50 only
    assert resumed["dynamics"]["source"] == str(model)
    with pytest.raises(UserError, match="does not fit this run"):
        ravl.train(
            tiny_args(pendulum_dataset, tmp_path / "other", model_hidden_dims=(16, 16), dynamics_path=str(model))
        )
    assert not (tmp_path / "other").exists()


def test_killed_while_its_model_trains_resumes_to_the_uninterrupted_run(pendulum_dataset, tmp_path, monkeypatch):
    """A fresh run checkpoints at step 0 and saves its model's training loop after every epoch; killed
    after the second of 3 epochs, --resume trains the third and ends as the uninterrupted run."""
    flags = dict(total_steps=50, **SCHEDULE)
    ref = ravl.train(tiny_args(pendulum_dataset, tmp_path / "ref", **flags))
    die_after_writes(monkeypatch, ravl, ravl.MODEL_PROGRESS_FILE, 2)
    with pytest.raises(KeyboardInterrupt):
        ravl.train(tiny_args(pendulum_dataset, tmp_path / "cut", **flags))
    run_dir = only_run_dir(tmp_path / "cut", "ravl")
    assert json.loads((run_dir / "record.json").read_text())["evaluations"] == []  # resumable from step 0
    assert (run_dir / ravl.MODEL_PROGRESS_FILE).exists() and not (run_dir / ravl.DYNAMICS_FILE).exists()
    resumed = ravl.train(tiny_args(pendulum_dataset, tmp_path / "cut", **flags, resume=str(run_dir)))
    strip = lambda r: [(e["step"], e["returns"], e["model_buffer"]) for e in r["evaluations"]]  # noqa: E731
    assert strip(resumed) == strip(ref) and len(ref["evaluations"]) == 2
    for key in ("epochs", "holdout_mse", "elites"):
        assert resumed["dynamics"][key] == ref["dynamics"][key]
    assert not (run_dir / ravl.MODEL_PROGRESS_FILE).exists()


def test_bad_dynamics_path_is_one_line_and_leaves_no_folder(pendulum_dataset, tmp_path):
    missing = tmp_path / "nope.msgpack"
    proc = run_algorithm("ravl", "--dataset", pendulum_dataset, "--dynamics-path", missing, "--out-dir",
                         tmp_path / "runs", cwd=tmp_path)  # fmt: skip
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [
        f"error: --dynamics-path {missing}: no such file; give the dynamics.msgpack (or the run directory) of an "
        "earlier RAVL run"
    ]
    garbage = tmp_path / "garbage.msgpack"
    garbage.write_bytes(b"not a model")
    with pytest.raises(UserError, match="not a RAVL dynamics model"):
        ravl.train(tiny_args(pendulum_dataset, tmp_path / "runs", dynamics_path=str(garbage)))
    assert not (tmp_path / "runs").exists()


def test_a_sweep_point_equals_the_plain_run_with_its_value(pendulum_dataset, tmp_path):
    """--sweep tau=0.005,0.5 with one seed: member 1 (tau 0.5; the targets follow the critics, far from
    point 0's) ends where a plain --tau 0.5 run on the sweep's model (--dynamics-path) does, its model
    buffer too. Eta 0: with one action dimension grad_a Q / |grad_a Q| is a step, whose gradient spikes
    where |grad_a Q| ~ 1e-10, so any rounding difference between programs of 2 members and of 1 can
    send the critics apart (measured: 1e-2 after 50 updates, 2 devices against 1)."""
    flags = dict(total_steps=50, eval_every=50, eta=0.0)
    record = ravl.train(tiny_args(pendulum_dataset, tmp_path / "sweep", sweep=("tau=0.005,0.5",), **flags))
    run_dir = only_run_dir(tmp_path / "sweep", "ravl")
    ravl.train(tiny_args(pendulum_dataset, tmp_path / "plain", tau=0.5, dynamics_path=str(run_dir), **flags))
    swept, alone = (serialization.msgpack_restore((only_run_dir(tmp_path / d, "ravl") / "checkpoint.msgpack")
                                                  .read_bytes()) for d in ("sweep", "plain"))  # fmt: skip
    for part in ("state", "online"):  # the agent, and the model buffer its rollouts filled
        for a, b in zip(jax.tree_util.tree_leaves(swept[part]), jax.tree_util.tree_leaves(alone[part]), strict=True):
            assert np.shape(a)[0] == 2 and np.shape(b)[0] == 1
            np.testing.assert_allclose(np.asarray(a)[1:], np.asarray(b), atol=2e-4, rtol=2e-3)  # point 1, seed 0
    assert [p["point"] for p in record["final_per_point"]] == [{"tau": 0.005}, {"tau": 0.5}]
    assert record["evaluations"][-1]["model_buffer"]["size"][0] > 0


def test_true_dynamics_rollouts_fill_the_buffer(pendulum_dataset, tmp_path):
    record = ravl.train(tiny_args(pendulum_dataset, tmp_path, total_steps=50, eval_every=50, true_dynamics=True))
    buffer = record["evaluations"][-1]["model_buffer"]
    # Two rounds of 100 simulator rollouts; InvertedPendulum's reward is 1 on every step but the terminal one.
    assert 200 <= buffer["size"][0] <= 1000 and 0 < buffer["terminal_fraction"][0] < 1
    assert buffer["reward_mean"][0] == pytest.approx(1.0 - buffer["terminal_fraction"][0], abs=1e-3)
    assert record["dynamics"] == {"source": "simulator"}
    assert record["evaluations"][-1]["timing"]["rollout_rounds"] == 1  # the first round is not timed
    assert not (only_run_dir(tmp_path, "ravl") / "dynamics.msgpack").exists()
