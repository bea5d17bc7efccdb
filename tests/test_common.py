"""common/: loading (truncation, caching, errors) and vectorized evaluation."""

import os
import time

import gymnasium as gym
import jax.numpy as jnp
import minari
import numpy as np
import pytest
from minari.data_collector import EpisodeBuffer

from common import data as data_mod
from common.data import load_dataset, validate_id
from common.evaluation import evaluate
from common.logging import atomic_write, first_nonfinite


def write_hand_built(dataset_id):
    """Two Pendulum-v1 episodes: one terminated after 3 steps, one truncated after 4 steps."""
    env = gym.make("Pendulum-v1")
    obs_a = np.arange(4 * 3, dtype=np.float64).reshape(4, 3)
    obs_b = 100 + np.arange(5 * 3, dtype=np.float64).reshape(5, 3)
    episodes = [
        EpisodeBuffer(id=0, observations=obs_a, actions=np.full((3, 1), 0.5, np.float32),
                      rewards=np.array([1.0, 2.0, 3.0]), terminations=np.array([False, False, True]),
                      truncations=np.array([False, False, False])),
        EpisodeBuffer(id=1, observations=obs_b, actions=np.full((4, 1), -0.5, np.float32),
                      rewards=np.array([1.0, 1.0, 1.0, 1.0]), terminations=np.zeros(4, bool),
                      truncations=np.array([False, False, False, True])),
    ]  # fmt: skip
    minari.create_dataset_from_buffers(
        dataset_id, episodes, env=env, algorithm_name="hand", code_permalink="tests", author="t",
        author_email="-", ref_min_score=0.0, ref_max_score=10.0, data_format="hdf5",
    )  # fmt: skip
    return obs_a, obs_b


def test_truncation_and_terminal_handling():
    obs_a, obs_b = write_hand_built("test/hand/trunc-v0")
    data, meta = load_dataset("test/hand/trunc-v0", to_device=False)
    assert meta.size == 7 and meta.obs_dim == 3 and meta.action_dim == 1
    np.testing.assert_array_equal(data.terminals, [0, 0, 1, 0, 0, 0, 0])
    # The truncated episode's last transition is not terminal, and its next observation is the true last one.
    np.testing.assert_array_equal(data.truncations, [0, 0, 0, 0, 0, 0, 1])
    np.testing.assert_allclose(data.next_observations[6], obs_b[4])
    np.testing.assert_allclose(data.observations[3:7], obs_b[:4])
    np.testing.assert_allclose(data.next_observations[:3], obs_a[1:])
    np.testing.assert_array_equal(data.episode_starts, [1, 0, 0, 1, 0, 0, 0])
    np.testing.assert_array_equal(data.timesteps, [0, 1, 2, 0, 1, 2, 3])
    np.testing.assert_allclose(meta.episode_returns, [6.0, 4.0])
    assert meta.domain == "locomotion" and (meta.ref_min_score, meta.ref_max_score) == (0.0, 10.0)
    np.testing.assert_allclose(meta.normalize([5.0]), [50.0])


def test_flat_cache_is_used_and_invalidated():
    write_hand_built("test/hand/cache-v0")
    _, meta1 = load_dataset("test/hand/cache-v0", to_device=False)
    cache = data_mod.dataset_dir("test/hand/cache-v0") / data_mod.CACHE_NAME
    assert cache.exists()
    # A cache whose key no longer matches the hdf5 file (size, mtime) is rebuilt, not trusted.
    with np.load(cache) as z:
        arrays = {k: z[k] for k in z.files}
    arrays["rewards"] = arrays["rewards"] * 0 + 99
    np.savez(cache, **arrays)
    data, _ = load_dataset("test/hand/cache-v0", to_device=False)
    assert data.rewards.max() == 99  # same key: the cache is what is loaded
    hdf5 = data_mod.dataset_dir("test/hand/cache-v0") / "data" / "main_data.hdf5"
    os.utime(hdf5, ns=(time.time_ns(), time.time_ns() + 10**9))
    data, meta2 = load_dataset("test/hand/cache-v0", to_device=False)
    assert data.rewards.max() == 3.0 and meta2.fingerprint == meta1.fingerprint


def test_missing_dataset_gives_one_clear_error_fast():
    t0 = time.time()
    with pytest.raises(FileNotFoundError) as err:
        load_dataset("mujoco/nosuchrobot/medium-v0")
    assert time.time() - t0 < 2.0
    msg = str(err.value)
    assert "mujoco/nosuchrobot/medium-v0" in msg and "minari download" in msg and "datasets/make.py" in msg
    assert not data_mod.dataset_dir("mujoco/nosuchrobot/medium-v0").exists()


@pytest.mark.parametrize("bad", ["hopper-medium", "local/hopper/medium", "local/hopper/medium-vX", "../x-v0"])
def test_malformed_ids_rejected_before_minari(bad):
    with pytest.raises(ValueError, match="namespace/name-vN"):
        validate_id(bad)
    with pytest.raises(ValueError):
        load_dataset(bad)


def test_unknown_local_id_lists_valid_ids():
    with pytest.raises(ValueError, match="local/hopper/medium-replay-v0"):
        load_dataset("local/hopper/superb-v0")


def test_discrete_actions_rejected():
    env = gym.make("CartPole-v1")
    ep = EpisodeBuffer(id=0, observations=np.zeros((3, 4)), actions=np.array([0, 1]), rewards=np.ones(2),
                       terminations=np.array([False, True]), truncations=np.zeros(2, bool))  # fmt: skip
    minari.create_dataset_from_buffers(
        "test/cartpole/discrete-v0", [ep], env=env, algorithm_name="x", code_permalink="x", author="x",
        author_email="-", ref_min_score=0.0, ref_max_score=1.0, data_format="hdf5",
    )  # fmt: skip
    with pytest.raises(data_mod.UserError, match="Box"):
        load_dataset("test/cartpole/discrete-v0")


def test_domains():
    assert data_mod.domain_of("D4RL/antmaze/umaze-v1", "AntMaze_UMaze-v4") == "antmaze"
    assert data_mod.domain_of("D4RL/pen/human-v2", "AdroitHandPen-v1") == "adroit"
    assert data_mod.domain_of("local/pointmaze/umaze-sparse-v0", "PointMaze_UMaze-v3") == "pointmaze"
    assert data_mod.domain_of("test/pendulum/pd-v0", "InvertedPendulum-v5") == "locomotion"
    assert data_mod.domain_of("D4RL/kitchen/mixed-v2", "FrankaKitchen-v1") == "kitchen"


# --- evaluation -------------------------------------------------------------------------------
def manual_rollouts(meta, gain, seed, episodes):
    env = meta.make_env()
    returns, lengths = [], []
    for j in range(episodes):
        obs, _ = env.reset(seed=seed + j)
        ret, n, done = 0.0, 0, False
        while not done:
            obs, r, term, trunc, _ = env.step(meta.to_env_action(np.clip(gain * obs[1:2], -1, 1)))
            ret, n, done = ret + r, n + 1, term or trunc
        returns.append(ret)
        lengths.append(n)
    return np.array(returns), np.array(lengths)


def weak_controller(params, carry, obs, prev_reward, rng):
    # params["k"]: (num_seeds,) a gain on the pole angle; too weak to balance for long
    return jnp.clip(params["k"][:, None, None] * obs[..., 1:2], -1, 1), carry


def test_evaluate_counts_exactly_each_episode(pendulum_dataset):
    _, meta = load_dataset(pendulum_dataset, to_device=False)
    gains = [0.5 / 3, 1.0 / 3]  # the policy's [-1, 1] maps to the env's [-3, 3]
    params = {"k": jnp.array(gains)}  # two "seeds", two controllers
    result = evaluate(meta, weak_controller, params, num_episodes=4, seed=7)
    assert result.returns.shape == (2, 4) and result.success is None
    for s, k in enumerate(gains):
        returns, lengths = manual_rollouts(meta, k, seed=7, episodes=4)
        # Episodes end at different times; nothing after an env's end (NEXT_STEP autoreset) is counted.
        assert len(set(lengths)) > 1
        np.testing.assert_allclose(result.returns[s], returns)
        np.testing.assert_array_equal(result.lengths[s], lengths)
    np.testing.assert_allclose(result.normalized, meta.normalize(result.returns))
    again = evaluate(meta, weak_controller, params, num_episodes=4, seed=7)
    np.testing.assert_array_equal(again.returns, result.returns)  # seeded and reproducible


def test_evaluation_in_worker_processes_equals_in_process(pendulum_dataset, monkeypatch):
    """JAXORL_EVAL_WORKERS=2 steps the envs in two worker processes (as on a GPU machine's many cores):
    the same episodes as in this process, kept between evaluations; a bad value is one clear error."""
    from common import evaluation
    from common.data import UserError

    _, meta = load_dataset(pendulum_dataset, to_device=False)
    params = {"k": jnp.array([0.5 / 3, 1.0 / 3, 0.8 / 3])}
    monkeypatch.setenv("JAXORL_EVAL_WORKERS", "0")
    here = evaluate(meta, weak_controller, params, num_episodes=3, seed=3)
    assert len(set(here.lengths.ravel())) > 1  # episodes end at different times
    monkeypatch.setenv("JAXORL_EVAL_WORKERS", "2")
    try:
        pooled = evaluate(meta, weak_controller, params, num_episodes=3, seed=3)
        pool = evaluation._pool[1]
        assert [p.poll() for p in pool.procs] == [None, None] and pool.blocks == [(0, 4), (4, 9)]
        again = evaluate(meta, weak_controller, params, num_episodes=3, seed=3)
        assert evaluation._pool[1] is pool  # the workers are reused, not restarted
    finally:
        evaluation.drop_pool()
    assert all(p.returncode == 0 for p in pool.procs)  # they exit when their pipe closes
    for result in (pooled, again):
        np.testing.assert_array_equal(result.returns, here.returns)
        np.testing.assert_array_equal(result.lengths, here.lengths)
    monkeypatch.setenv("JAXORL_EVAL_WORKERS", "two")
    with pytest.raises(UserError, match="JAXORL_EVAL_WORKERS='two'"):
        evaluate(meta, weak_controller, params, num_episodes=3, seed=3)


def test_first_nonfinite_names_seed_step_and_losses():
    metrics = {"a": np.array([[0.0, 1.0, np.nan], [0.0, np.inf, 1.0]]), "b": np.zeros((2, 3))}
    assert first_nonfinite(metrics, 100, seeds=[5, 6]) == "seed 6, step 102: a=inf"
    assert first_nonfinite({"b": np.zeros((2, 3))}, 0, seeds=[0, 1]) is None


def test_atomic_write_keeps_old_file_on_failure(tmp_path, monkeypatch):
    target = tmp_path / "record.json"
    atomic_write(target, '{"ok": 1}')

    def boom(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError):
        atomic_write(target, '{"half": ')
    assert target.read_text() == '{"ok": 1}'


# --- action bounds ----------------------------------------------------------------------------
def write_boxed_pendulum(dataset_id, low, high):
    """Three 200-step Pendulum episodes through RescaleAction to the Box [low, high], whose actions
    sit at low, the middle and high."""
    from gymnasium.wrappers import RescaleAction

    env = RescaleAction(gym.make("Pendulum-v1"), low, high)  # the spec records the wrapper
    episodes = []
    for i, value in enumerate([low, (low + high) / 2, high]):
        obs, _ = env.reset(seed=i)
        observations, actions, rewards = [obs], [], []
        for _ in range(200):
            obs, r, *_ = env.step(np.array([value], np.float32))
            observations.append(obs), actions.append([value]), rewards.append(r)
        episodes.append(EpisodeBuffer(id=i, observations=np.asarray(observations), rewards=np.asarray(rewards),
                                      actions=np.asarray(actions, np.float32), terminations=np.zeros(200, bool),
                                      truncations=np.eye(200, dtype=bool)[-1]))  # fmt: skip
    minari.create_dataset_from_buffers(
        dataset_id, episodes, env=env, algorithm_name="x", code_permalink="x", author="x",
        author_email="-", ref_min_score=-1500.0, ref_max_score=0.0, data_format="hdf5",
    )  # fmt: skip
    return env


@pytest.mark.parametrize("low, high, name", [(-0.4, 0.4, "pm04"), (0.0, 2.0, "zero2")])
def test_actions_mapped_into_unit_box_and_back_in_evaluation(low, high, name):
    dataset_id = f"test/box/{name}-v0"
    env = write_boxed_pendulum(dataset_id, low, high)
    data, meta = load_dataset(dataset_id, to_device=False)
    np.testing.assert_allclose(data.actions[[0, 200, 400], 0], [-1.0, 0.0, 1.0], atol=1e-6)
    np.testing.assert_allclose(meta.to_env_action(np.array([[-1.0], [0.0], [1.0], [3.0]]))[:, 0],
                               [low, (low + high) / 2, high, high], atol=1e-6)  # fmt: skip

    def policy(params, carry, obs, prev_reward, rng):  # always +1: the env must receive `high`
        return jnp.ones(obs.shape[:-1] + (1,)), carry

    result = evaluate(meta, policy, jnp.zeros((1, 1)), num_episodes=2, seed=7)
    for j in range(2):  # the same episodes stepped by hand with action `high`
        env.reset(seed=7 + j)
        expected = sum(env.step(np.array([high], np.float32))[1] for _ in range(200))
        np.testing.assert_allclose(result.returns[0, j], expected, rtol=1e-5)


def test_unbounded_action_space_refused():
    with pytest.raises(data_mod.UserError, match="unbounded"):
        data_mod.check_action_space("test/x-v0", gym.spaces.Box(-np.inf, np.inf, (2,)))
    with pytest.raises(data_mod.UserError, match="unbounded"):  # half-bounded
        data_mod.check_action_space("test/x-v0", gym.spaces.Box(np.array([0.0, 0.0]), np.array([1.0, np.inf])))


def test_online_envs_give_the_true_last_observation_and_replay_exactly():
    from common.evaluation import OnlineEnvs

    write_boxed_pendulum("test/box/online-v0", -2.0, 2.0)
    _, meta = load_dataset("test/box/online-v0", to_device=False)
    rng = np.random.default_rng(0)
    actions = rng.uniform(-1, 1, (230, 2, 1)).astype(np.float32)
    envs = OnlineEnvs(meta, [5, 6])
    obs = envs.reset()
    trace = []
    for a in actions:
        obs, reward, term, trunc, true_next = envs.step(a)
        trace.append((obs, reward, trunc, true_next))
    # Pendulum truncates at step 200: `true_next` is the last observation of the episode, `obs` the reset one.
    obs199, _, trunc199, true199 = trace[199]
    assert trunc199.all() and not trace[198][2].any()
    single = meta.make_env()
    single.reset(seed=5)
    for a in actions[:200, 0]:
        last = single.step(meta.to_env_action(a))[0]
    np.testing.assert_allclose(true199[0], last)
    assert not np.allclose(obs199[0], last)
    # A checkpoint's actions, replayed from the same resets, rebuild the same environments: only the
    # episodes running at the checkpoint are stepped again (both began at step 200).
    restored = OnlineEnvs(meta, [5, 6])
    seen = []
    now = restored.restore(envs.state(), on_step=lambda *step: seen.append(step))
    np.testing.assert_array_equal(now, obs)
    assert len(seen) == 30 and len(restored.actions) == 230
    np.testing.assert_array_equal(seen[0][0], obs199)
    more = rng.uniform(-1, 1, (2, 1)).astype(np.float32)
    np.testing.assert_array_equal(restored.step(more)[0], envs.step(more)[0])
    # A checkpoint without the episode ends (written before they were kept) is replayed from the first reset.
    old = OnlineEnvs(meta, [5, 6])
    seen = []
    now = old.restore({"env_actions": np.stack(envs.actions[:230])}, on_step=lambda *step: seen.append(step))
    np.testing.assert_array_equal(now, obs)
    assert len(seen) == 230
    np.testing.assert_array_equal(seen[199][5], true199)


def test_online_envs_resume_steps_only_the_running_episodes(pendulum_dataset):
    """InvertedPendulum under random actions: episodes end at different steps in each environment, so
    each is fast-forwarded to the step where the earliest running episode began, then all replay."""
    from common.evaluation import OnlineEnvs

    _, meta = load_dataset(pendulum_dataset, to_device=False)
    rng = np.random.default_rng(1)
    envs = OnlineEnvs(meta, [5, 6, 7])
    envs.reset()
    for a in rng.uniform(-1, 1, (150, 3, 1)).astype(np.float32):
        obs = envs.step(a)[0]
    state = envs.state()
    last_end = [int(np.flatnonzero(e)[-1]) for e in state["env_ended"].T]
    assert len(set(last_end)) >= 2 and all(e.sum() >= 2 for e in state["env_ended"].T)  # several episodes each
    t0 = min(last_end) + 1
    restored, seen = OnlineEnvs(meta, [5, 6, 7]), []
    np.testing.assert_array_equal(restored.restore(state, on_step=lambda *step: seen.append(step)), obs)
    assert len(seen) == 150 - t0 and len(restored.actions) == 150
    for a in rng.uniform(-1, 1, (30, 3, 1)).astype(np.float32):
        for x, y in zip(restored.step(a), envs.step(a)):
            np.testing.assert_array_equal(x, y)
    # A checkpoint the shortcut does not rebuild (its observations altered here) is replayed from the start.
    bad = {**envs.state(), "env_obs": envs.obs + 1.0}
    seen = []
    np.testing.assert_array_equal(OnlineEnvs(meta, [5, 6, 7]).restore(bad, on_step=lambda *s: seen.append(s)), envs.obs)
    assert len(seen) == 180
