"""ReinFlow: flow matching on a bimodal toy, the chain's log-likelihood recomputed exactly (PPO's
ratio is 1 before the first update, on one time grid), GAE with a terminal and a truncation, reward
scaling, sigma's bounds, the schedules, chunked data and environments, and the command line end to
end (pre-training beats random, a run killed in its online phase resumes to the same evaluations)."""

import dataclasses
import functools
import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tyro
from flax import serialization
from helpers import assert_policy_reloads, only_run_dir, run_algorithm

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "algorithms"))
import reinflow  # noqa: E402

OBS_DIM, ACTION_DIM, K = 3, 2, 4
# learning_rate, weight_decay, ema_decay, discount, gae_lambda, clip_coef, ent_coef, vf_coef, target_kl,
# sigma_min, critic_weight_decay
HP = reinflow.Hyper(*map(jnp.float32, (3e-3, 0.0, 0.0, 0.99, 0.95, 0.01, 0.03, 0.5, 1.0, 0.1, 1e-5)))
SIGMA_MAX = jnp.float32(0.24)


@functools.cache  # one init compile for the tests that share the default agent
def agent(obs_dim=OBS_DIM, action_dim=ACTION_DIM, **kw):
    args = reinflow.Args(**{**dict(hidden_dims=(32, 32, 32), critic_hidden_dims=(16, 16, 16), noise_hidden_dims=(16,),
                                   num_envs=4, sigma_min=0.1, sigma_max=0.24, ema_start=0.0), **kw})  # fmt: skip
    init, pretrain_update, ppo_update, parts = reinflow.make_agent(args, obs_dim, action_dim)
    parts = {k: jax.jit(v) for k, v in parts.items() if k in ("sample_chain", "chain_log_prob", "transition")}
    return jax.jit(init)(jax.random.key(0)), pretrain_update, ppo_update, parts


# --- flow matching ----------------------------------------------------------------------------
def test_flow_matching_learns_both_modes_of_a_bimodal_toy():
    """Actions at -0.6 or +0.6 (std 0.05) in one state: the loss falls and samples land in both
    modes, not between them. Rectified flow's paths bend between modes, so few Euler steps blur
    them (4 steps leave most samples between the modes here): these samples take 16."""
    state, pretrain_update, _, _ = agent(1, 1, chunk_len=1, ema_decay=0.0)
    obs = jnp.zeros((256, 1))

    @jax.jit
    def fit(state, key):
        def body(s, k):
            k_mode, k_noise = jax.random.split(k)
            modes = jnp.where(jax.random.bernoulli(k_mode, 0.5, (256, 1)), 0.6, -0.6)
            return pretrain_update(s, obs, modes + 0.05 * jax.random.normal(k_noise, (256, 1)), k, HP)

        return jax.lax.scan(body, state, jax.random.split(key, 600))

    state, metrics = fit(state, jax.random.key(1))
    loss = np.asarray(metrics["flow_loss"])
    assert loss[-100:].mean() < 0.7 * loss[:100].mean()
    args16 = reinflow.Args(hidden_dims=(32, 32, 32), chunk_len=1, denoising_steps=16)
    denoise = jax.jit(reinflow.make_agent(args16, 1, 1)[3]["denoise"])
    x = np.asarray(denoise(state.ema, jnp.zeros((4000, 1)), jax.random.key(2), reinflow.time_grid(16)))[:, 0]
    near_plus, near_minus = (np.abs(x - 0.6) < 0.2).mean(), (np.abs(x + 0.6) < 0.2).mean()
    assert near_plus > 0.3 and near_minus > 0.3, (near_plus, near_minus)
    assert (np.abs(x) < 0.2).mean() < 0.1


# --- the chain's likelihood and PPO's first ratio ---------------------------------------------
def test_recomputed_log_prob_equals_the_sampled_one_on_one_time_grid():
    state, _, _, parts = agent()
    actor = (state.velocity, state.noise)
    obs = jax.random.normal(jax.random.key(1), (256, OBS_DIM))
    grid = reinflow.time_grid(K)
    np.testing.assert_array_equal(grid, [0.0, 0.25, 0.5, 0.75])
    chain, sampled = parts["sample_chain"](actor, obs, jax.random.key(2), SIGMA_MAX, HP, grid)
    assert chain.shape == (256, K + 1, 4 * ACTION_DIM) and float(jnp.abs(chain[:, -1]).max()) <= 1.0
    recomputed, entropy, _ = parts["chain_log_prob"](actor, obs, chain, SIGMA_MAX, HP, grid)
    assert float(jnp.abs(recomputed - sampled).max()) < 1e-5
    # The official code's rollout grid linspace(0, 1, K) in either place breaks the equality.
    official = jnp.linspace(0.0, 1.0, K)
    other, _, _ = parts["chain_log_prob"](actor, obs, chain, SIGMA_MAX, HP, official)
    assert float(jnp.abs(other - sampled).max()) > 1e-3
    chain2, sampled2 = parts["sample_chain"](actor, obs, jax.random.key(2), SIGMA_MAX, HP, official)
    again, _, _ = parts["chain_log_prob"](actor, obs, chain2, SIGMA_MAX, HP, jnp.linspace(0.0, 0.75, K))
    assert float(jnp.abs(again - sampled2).max()) > 1e-3
    # Per step and dimension: the entropy of sigmas within [0.1, 0.24] and of the initial N(0, 1).
    half_log_2pie = 0.5 * np.log(2 * np.pi * np.e)
    assert half_log_2pie + np.log(0.1) - 1e-5 <= float(entropy.min()) <= float(entropy.max()) <= half_log_2pie


def test_ppo_update_starts_at_ratio_one_and_trains_actor_and_critic():
    state, _, ppo_update, parts = agent()
    T, E = 8, 4
    obs = jax.random.normal(jax.random.key(1), (T * E, OBS_DIM))
    chain, log_prob = parts["sample_chain"]((state.velocity, state.noise), obs, jax.random.key(2), SIGMA_MAX, HP,
                                            reinflow.time_grid(K))  # fmt: skip
    rng = np.random.default_rng(0)
    rollout = reinflow.Rollout(
        obs.reshape(T, E, -1), chain.reshape(T, E, K + 1, -1), log_prob.reshape(T, E),
        jnp.asarray(rng.normal(size=(T, E)), jnp.float32), jnp.zeros((T, E)), jnp.zeros((T, E)),
        jnp.asarray(rng.normal(size=(T, E, OBS_DIM)), jnp.float32),
    )  # fmt: skip
    sched = reinflow.Schedule(*map(jnp.float32, (1e-3, 1e-3, 0.24, 1.0)))
    update = jax.jit(ppo_update, static_argnums=5)
    identity = lambda o: o  # noqa: E731  (observations already normalized)
    new, metrics = update(state, rollout, jax.random.key(3), HP, sched, identity)
    assert float(metrics["ratio_first_max_dev"]) < 1e-5
    assert float(metrics["minibatches_done"]) == 5 * 4  # epochs x minibatches: the KL stays below 1
    for name in ("velocity", "noise", "critic"):
        delta = jax.tree_util.tree_map(lambda a, b: jnp.abs(a - b).max(), getattr(new, name), getattr(state, name))
        assert max(jax.tree_util.tree_leaves(delta)) > 0, name
    # During the critic warm-up the actor stays as it was.
    frozen, _ = update(state, rollout, jax.random.key(3), HP, sched._replace(train_actor=jnp.float32(0)), identity)
    for a, b in zip(jax.tree_util.tree_leaves(frozen.velocity), jax.tree_util.tree_leaves(state.velocity)):
        np.testing.assert_array_equal(a, b)


# --- returns ----------------------------------------------------------------------------------
def test_gae_with_a_terminal_and_a_truncation_matches_hand_computed_values():
    """One environment, 5 chunks: a terminal at t = 1 (no bootstrap, recursion cut), a truncation at
    t = 3 (bootstrap from the true last state's value 10, recursion cut); gamma 0.9, lambda 0.8."""
    rewards = jnp.array([[1.0], [2.0], [3.0], [4.0], [5.0]])
    values = jnp.array([[0.5], [1.0], [1.5], [2.0], [2.5]])
    next_values = jnp.array([[1.0], [7.0], [2.0], [10.0], [3.0]])  # at t = 1 ignored (terminal)
    terminals = jnp.array([[0.0], [1.0], [0.0], [0.0], [0.0]])
    truncations = jnp.array([[0.0], [0.0], [0.0], [1.0], [0.0]])
    adv, returns = reinflow.gae(rewards, values, next_values, terminals, truncations, 0.9, 0.8)
    # delta_4 = 5 + 0.9 * 3 - 2.5 = 5.2; A_4 = 5.2
    # delta_3 = 4 + 0.9 * 10 - 2 = 11;   A_3 = 11 (truncated: the recursion stops)
    # delta_2 = 3 + 0.9 * 2 - 1.5 = 3.3; A_2 = 3.3 + 0.72 * 11 = 11.22
    # delta_1 = 2 - 1 = 1 (terminal);    A_1 = 1
    # delta_0 = 1 + 0.9 * 1 - 0.5 = 1.4; A_0 = 1.4 + 0.72 * 1 = 2.12
    np.testing.assert_allclose(adv[:, 0], [2.12, 1.0, 11.22, 11.0, 5.2], rtol=1e-6)
    np.testing.assert_allclose(returns[:, 0], [2.62, 2.0, 12.72, 13.0, 7.7], rtol=1e-6)


def test_reward_scaling_follows_the_running_discounted_return():
    """DPPO's RunningRewardScaler: returns restart after a done (also across iterations), their
    running variance starts at 1 with count 1e-4, rewards are divided by its root and clipped."""
    scaler = reinflow.RewardScaler(jnp.zeros(1), jnp.ones(1), jnp.float32(0), jnp.float32(1), jnp.float32(1e-4))
    rewards, dones = jnp.array([[1.0], [2.0], [3.0]]), jnp.array([[0.0], [1.0], [0.0]])
    scaled, scaler = reinflow.scale_rewards(scaler, rewards, dones, 0.5)
    rets = np.array([1.0, 2.0 + 0.5 * 1.0, 3.0])  # the third restarts after the done at t = 1
    count = 1e-4 + 3
    mean = rets.mean() * 3 / count
    var = (1e-4 + rets.var() * 3 + rets.mean() ** 2 * 1e-4 * 3 / count) / (count - 1)
    np.testing.assert_allclose(scaled[:, 0], [1.0, 2.0, 3.0] / np.sqrt(var + 1e-8), rtol=1e-5)
    np.testing.assert_allclose(
        [scaler.mean, scaler.var, scaler.count, scaler.ret[0]], [mean, var, count, 3.0], rtol=1e-5
    )
    # Next iteration: the running return continues (no done at t = 2). A tiny running variance clips at 10.
    _, scaler = reinflow.scale_rewards(scaler, jnp.array([[5.0]]), jnp.array([[0.0]]), 0.5)
    assert float(scaler.ret[0]) == 5.0 + 0.5 * 3.0
    tiny = reinflow.RewardScaler(jnp.zeros(1), jnp.zeros(1), jnp.float32(0), jnp.float32(1e-6), jnp.float32(1e6))
    scaled, _ = reinflow.scale_rewards(tiny, jnp.array([[1.0], [-1.0]]), jnp.zeros((2, 1)), 0.5)
    np.testing.assert_array_equal(scaled[:, 0], [10.0, -10.0])


# --- sigma and the schedules ------------------------------------------------------------------
def test_sigma_stays_within_its_bounds_for_extreme_network_outputs():
    raw = jnp.array([-jnp.inf, -1e30, -50.0, -1.0, 0.0, 1.0, 50.0, 1e30, jnp.inf])
    sigma = np.asarray(reinflow.bounded_sigma(raw, jnp.float32(0.1), jnp.float32(0.24)))
    assert sigma.min() >= np.float32(0.1) and sigma.max() <= np.float32(0.24)
    assert sigma[0] == np.float32(0.1) and sigma[-1] == np.float32(0.24) and np.all(np.diff(sigma) >= 0)
    np.testing.assert_allclose(sigma[4], np.sqrt(0.1 * 0.24), rtol=1e-6)  # the geometric middle
    # Through the noise net with weights blown up 1e4 times: every step of every sample in bounds.
    state, _, _, parts = agent()
    noise = jax.tree_util.tree_map(lambda w: w * 1e4, state.noise)
    x = jax.random.normal(jax.random.key(1), (512, 4 * ACTION_DIM))
    obs = 10 * jax.random.normal(jax.random.key(2), (512, OBS_DIM))
    _, sigma = parts["transition"]((state.velocity, noise), x, jnp.full(512, 0.5), obs, jnp.float32(0.2), HP)
    sigma = np.asarray(sigma)
    assert sigma.min() >= np.float32(0.1) and sigma.max() <= np.float32(0.2)
    assert sigma.min() == pytest.approx(0.1, rel=1e-6) and sigma.max() == pytest.approx(0.2, rel=1e-6)  # saturated


def test_schedules_follow_the_official_configs():
    args = reinflow.Args(actor_lr=4.5e-5, actor_min_lr=2e-5, critic_lr=6.5e-4, critic_min_lr=3e-4,
                         critic_warmup_iters=5, sigma_min=0.1, sigma_max=0.24)  # fmt: skip
    sched = [reinflow.iteration_schedule(i, 200, args) for i in range(200)]
    sigma_max = np.array([s.sigma_max for s in sched])
    assert np.all(sigma_max[:71] == np.float32(0.24))  # held for 35% of 200 iterations (set after each)
    assert np.all(np.diff(sigma_max) <= 0) and sigma_max[-1] == pytest.approx(0.198, abs=1e-4)
    critic_lr = np.array([s.critic_lr for s in sched])
    np.testing.assert_allclose(critic_lr[[0, 5, 10, 55, 100, 110]], [3e-4, 4.75e-4, 6.5e-4, 4.75e-4, 3e-4, 6.5e-4],
                               rtol=1e-5)  # fmt: skip
    assert [s.train_actor for s in sched[:6]] == [0, 0, 0, 0, 0, 1]
    assert sched[5].actor_lr == np.float32(2e-5) and sched[15].actor_lr == np.float32(4.5e-5)  # counted from 5


# --- data and environments --------------------------------------------------------------------
def test_chunks_never_cross_an_episode_end():
    starts = np.zeros(13, bool)
    starts[[0, 5, 8]] = True  # episodes of 5, 3 and 5 steps
    np.testing.assert_array_equal(reinflow.chunk_starts(starts, 4), [0, 1, 8, 9])


def test_chunk_envs_drop_the_rest_of_a_chunk_at_an_episode_end_and_replay_exactly(pendulum_dataset):
    from common.data import load_dataset

    _, meta = load_dataset(pendulum_dataset, to_device=False)
    reference = meta.make_env()
    for force in (1.0, 0.8, 0.6, 0.4):  # a push whose fall lands inside a chunk, one action at a time
        reference.reset(seed=0)
        fall, total, term = 0, 0.0, False
        while not term:
            fall_obs, r, term, _, _ = reference.step(np.full(1, 3 * force, np.float32))  # the env's Box is [-3, 3]
            fall, total = fall + 1, total + r
        if fall % 4:
            break
    envs = reinflow.ChunkEnvs(meta, [0, 1])
    envs.reset()
    push = np.stack([np.full((4, 1), force), np.zeros((4, 1))]).astype(np.float32)  # env 0 falls, env 1 waits
    rewards = []
    while True:
        obs, reward, term, trunc, true_next = envs.step(push)
        rewards.append(reward[0])
        if term[0]:
            break
    assert fall % 4 and len(rewards) == -(-fall // 4)  # the fall is inside the last chunk
    assert sum(rewards) == total  # nothing after the fall was run or counted
    np.testing.assert_array_equal(true_next[0], np.float32(fall_obs))  # the state at the fall, before the reset
    assert not np.allclose(obs[0], true_next[0]) and np.allclose(obs[1], true_next[1]) and not term[1]
    # The checkpoint keeps each environment's resets and its running episode's chunks only: env 0 was
    # reset once and has run nothing since, env 1 has run every chunk.
    state = envs.state()
    assert state["env_resets"].tolist() == [1, 0] and state["env_running_len"].tolist() == [0, len(rewards)]
    replayed = reinflow.ChunkEnvs(meta, [0, 1])
    np.testing.assert_array_equal(replayed.restore(state), obs)
    more = np.stack([np.full((4, 1), 0.1), np.full((4, 1), -0.1)]).astype(np.float32)
    for x, y in zip(replayed.step(more), envs.step(more)):
        np.testing.assert_array_equal(x, y)
    with pytest.raises(RuntimeError, match="do not match"):  # one that does not rebuild says so
        reinflow.ChunkEnvs(meta, [0, 1]).restore({**state, "env_resets": np.array([0, 0])})


# --- the command line: pre-training, fine-tuning, resume --------------------------------------
FLAGS = ["--total-steps", "1000", "--eval-every", "200", "--online-steps", "600", "--hidden-dims", "64", "64", "64",
         "--critic-hidden-dims", "32", "32", "32", "--noise-hidden-dims", "16", "16", "--batch-size", "64",
         "--eval-episodes", "3", "--num-envs", "2", "--rollout-chunks", "25", "--update-epochs", "2",
         "--num-minibatches", "2", "--repeat-samples", "2", "--no-log"]  # fmt: skip


@pytest.fixture(scope="module")
def cli_run(pendulum_dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("cli")
    proc = run_algorithm("reinflow", "--dataset", pendulum_dataset, *FLAGS, "--out-dir", out, cwd=out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_dir = only_run_dir(out, "reinflow")
    return json.loads((run_dir / "record.json").read_text()), proc.stdout, run_dir


def test_cli_pretrains_beyond_random_then_fine_tunes(cli_run, pendulum_dataset):
    """Measured on 2 CPU cores: 100 after 1000 pre-training updates (random is 0 on this scale) and
    after 600 fine-tuning steps."""
    from common.data import load_dataset

    record, stdout, _ = cli_run
    _, meta = load_dataset(pendulum_dataset, to_device=False)
    phases = [(e["phase"], e["step"]) for e in record["evaluations"]]
    assert phases == [("offline", s) for s in range(200, 1001, 200)] + [("online", s) for s in (200, 400, 600)]
    assert record["finished"] and record["command"][0] == "algorithms/reinflow.py"
    assert record["final_offline"]["normalized_mean"] >= 10
    offline_returns = [e["returns"] for e in record["evaluations"] if e["phase"] == "offline"]
    assert np.mean(offline_returns[-1]) >= 0.25 * meta.episode_returns.mean()
    assert np.isfinite(record["final"]["normalized_mean"]) and record["evaluations"][-1]["train_env_steps_per_s"] > 0
    config = record["config"]
    assert (config["sigma_min"], config["sigma_max"], config["actor_lr"]) == (0.1, 0.24, 4.5e-5)  # hopper preset
    assert "3 PPO iterations of 200 environment steps" in stdout


class Killed(Exception):
    pass


def test_run_killed_in_its_online_phase_resumes_to_the_same_evaluations(cli_run, pendulum_dataset, tmp_path,
                                                                        monkeypatch):  # fmt: skip
    """Stopped right after the first online checkpoint (as a kill there would), then resumed in a new
    call: the environments are replayed, and every later evaluation equals the uninterrupted run's."""
    reference, _, reference_dir = cli_run
    args = tyro.cli(reinflow.Args, args=["--dataset", pendulum_dataset, *FLAGS, "--out-dir", str(tmp_path)])
    save = reinflow.RunLogger.save_checkpoint

    def save_then_die(self, state, step, rng, phase="offline", online=None, host=None):
        save(self, state, step, rng, phase, online, host)
        if phase == "online":
            raise Killed

    monkeypatch.setattr(reinflow.RunLogger, "save_checkpoint", save_then_die)
    with pytest.raises(Killed):
        reinflow.train(args)
    monkeypatch.setattr(reinflow.RunLogger, "save_checkpoint", save)
    run_dir = only_run_dir(tmp_path, "reinflow")
    resumed = reinflow.train(dataclasses.replace(args, resume=str(run_dir)))
    strip = lambda r: [(e["phase"], e["step"], e["returns"]) for e in r["evaluations"]]  # noqa: E731
    assert strip(resumed) == strip(reference)
    # The pendulum's evaluations saturate, so the final parameters, optimizer and reward-scaler states too.
    final = [serialization.msgpack_restore((d / "checkpoint.msgpack").read_bytes()) for d in (run_dir, reference_dir)]
    assert final[0]["step"] == final[1]["step"] == 600
    for a, b in zip(jax.tree_util.tree_leaves(final[0]["state"]), jax.tree_util.tree_leaves(final[1]["state"])):
        np.testing.assert_array_equal(a, b)


def test_cli_bad_sigma_range_is_one_line(tmp_path, monkeypatch, capsys):
    from common.logging import cli

    monkeypatch.setattr(sys, "argv", ["algorithms/reinflow.py", "--sigma-min", "0.3", "--sigma-max", "0.2",
                                      "--out-dir", str(tmp_path / "runs")])  # fmt: skip
    with pytest.raises(SystemExit) as exit_info:
        cli(reinflow.Args, reinflow.train, validate=reinflow.validate)
    assert exit_info.value.code == 1
    assert capsys.readouterr().err.strip().splitlines() == ["error: --sigma-min (0.3) must be below --sigma-max (0.2)"]
    assert not (tmp_path / "runs").exists()


def test_policy_reloads_from_the_run_directory(cli_run):
    """`load_policy` (what --eval-only uses) rebuilds the policy and reproduces the last evaluation."""
    assert_policy_reloads(cli_run[2])


def test_a_sweep_point_equals_the_plain_run_with_its_value(pendulum_dataset, tmp_path):
    """--sweep (the member axis, see tests/test_members.py): point 1 of a 2-point sweep, pre-trained and
    fine-tuned (--num-envs environments per member, reset as its seed's), ends where the plain run with
    its value does (the discount reaches the state through the reward scaler's running return)."""
    flags = ["--total-steps", "100", "--eval-every", "100", "--online-steps", "80", "--hidden-dims", "32", "32", "32",
             "--critic-hidden-dims", "16", "16", "16", "--noise-hidden-dims", "16", "--batch-size", "32",
             "--eval-episodes", "2", "--num-envs", "2", "--rollout-chunks", "10", "--update-epochs", "1",
             "--num-minibatches", "2", "--repeat-samples", "1", "--no-log"]  # fmt: skip
    args = tyro.cli(reinflow.Args, args=["--dataset", pendulum_dataset, *flags])
    record = reinflow.train(dataclasses.replace(args, out_dir=str(tmp_path / "sweep"), sweep=("discount=0.9,0.99",)))
    reinflow.train(dataclasses.replace(args, out_dir=str(tmp_path / "plain"), discount=0.99))
    swept, plain = [serialization.msgpack_restore((only_run_dir(tmp_path / d, "reinflow") / "checkpoint.msgpack")
                                                  .read_bytes())["state"] for d in ("sweep", "plain")]  # fmt: skip
    for a, b in zip(jax.tree_util.tree_leaves(swept), jax.tree_util.tree_leaves(plain)):
        np.testing.assert_allclose(np.asarray(a)[1], np.asarray(b)[0], atol=2e-4, rtol=2e-3)
    assert [p["point"] for p in record["final_per_point"]] == [{"discount": 0.9}, {"discount": 0.99}]
    assert [(e["phase"], e["step"]) for e in record["evaluations"]] == [("offline", 100), ("online", 80)]
