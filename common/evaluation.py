"""Vectorized evaluation: every episode of every seed runs side by side, one batched policy call
per environment step.

    result = evaluate(meta, policy, params, num_episodes=10, seed=0)
    result.normalized  # (num_seeds, num_episodes)

`policy(params, carry, obs, prev_reward, rng) -> (actions, carry)` sees obs of shape
(num_seeds, num_episodes, obs_dim) and params stacked over seeds; build it with `jax.vmap` and jit
it. Episode j of every seed resets with `seed + j`, so all seeds face the same start states.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, NamedTuple

import gymnasium as gym
import jax
import numpy as np

from common.data import Meta


class EvalResult(NamedTuple):
    returns: np.ndarray  # (num_seeds, num_episodes)
    normalized: np.ndarray  # (num_seeds, num_episodes)
    lengths: np.ndarray  # (num_seeds, num_episodes)
    success: np.ndarray | None  # (num_seeds, num_episodes) bool: goal reached at least once; None if no such info
    seconds: float = 0.0  # wall time of the whole evaluation (env creation to the last step)


# Evaluation episodes per seed where --eval-episodes is not given: as the papers evaluate (10 on
# locomotion; 100 on the goal-reaching mazes, as IQL and CORL on AntMaze).
EVAL_EPISODES = {"antmaze": 100, "pointmaze": 100}


def default_eval_episodes(domain: str) -> int:
    return EVAL_EPISODES.get(domain, 10)


def num_seeds_of(params) -> int:
    return int(jax.tree_util.tree_leaves(params)[0].shape[0])


def evaluate(
    meta: Meta,
    policy: Callable,
    params: Any,
    *,
    num_episodes: int,
    seed: int,
    carry: Any = None,
    rng: jax.Array | None = None,
) -> EvalResult:
    t0 = time.perf_counter()
    num_seeds = num_seeds_of(params)
    n = num_seeds * num_episodes
    envs = gym.vector.SyncVectorEnv([meta.make_env for _ in range(n)])
    try:
        obs, _ = envs.reset(seed=[seed + j for _ in range(num_seeds) for j in range(num_episodes)])
        rng = jax.random.key(seed) if rng is None else rng
        returns, lengths = np.zeros(n), np.zeros(n, np.int64)
        done, success = np.zeros(n, bool), np.zeros(n, bool)
        has_success = False
        prev_reward = np.zeros((num_seeds, num_episodes), np.float32)
        while not done.all():
            rng, key = jax.random.split(rng)
            flat = meta.flatten_obs(obs).reshape(num_seeds, num_episodes, -1)
            actions, carry = policy(params, carry, flat, prev_reward, key)
            actions = meta.to_env_action(np.asarray(actions).reshape(n, -1))
            obs, reward, term, trunc, info = envs.step(actions)
            # Gymnasium's NEXT_STEP autoreset: an env that ended is reset on its next step; mask it.
            alive = ~done
            returns += np.where(alive, reward, 0.0)
            lengths += alive
            if "success" in info:
                has_success = True
                success |= alive & np.asarray(info["success"], bool)
            done |= term | trunc
            prev_reward = np.asarray(reward, np.float32).reshape(num_seeds, num_episodes)
    finally:
        envs.close()
    shape = (num_seeds, num_episodes)
    return EvalResult(
        returns.reshape(shape),
        meta.normalize(returns).reshape(shape),
        lengths.reshape(shape),
        success.reshape(shape) if has_success else None,
        time.perf_counter() - t0,
    )


class OnlineEnvs:
    """One environment per seed for an online phase, resumable exactly.

    It remembers its reset seeds and every action it was given, so a resumed run rebuilds each
    environment's state (MuJoCo's state, elapsed steps, the env's RNG, a maze's goal) by replaying
    them from the same resets: MuJoCo is deterministic on one machine, and replay needs nothing
    environment-specific. Gymnasium's SAME_STEP autoreset: an ended episode's true last
    observation is returned as `true_next`, the reset one as `obs`.
    """

    def __init__(self, meta: Meta, reset_seeds: list[int]):
        self.meta, self.reset_seeds = meta, list(reset_seeds)
        self.envs = gym.vector.SyncVectorEnv(
            [meta.make_env for _ in reset_seeds], autoreset_mode=gym.vector.AutoresetMode.SAME_STEP
        )
        self.actions: list[np.ndarray] = []  # every step's actions, (num_envs, action_dim) float32 in [-1, 1]

    def reset(self) -> np.ndarray:
        self.actions = []
        return self.meta.flatten_obs(self.envs.reset(seed=self.reset_seeds)[0])

    def step(self, actions) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(obs, reward, terminated, truncated, true_next) after `actions` (in [-1, 1])."""
        actions = np.asarray(actions, np.float32)
        self.actions.append(actions)
        obs, reward, term, trunc, info = self.envs.step(self.meta.to_env_action(actions))
        obs = self.meta.flatten_obs(obs)
        true_next = obs.copy()
        for i in np.flatnonzero(term | trunc):
            true_next[i] = self.meta.flatten_obs(info["final_obs"][i])
        return obs, np.asarray(reward, np.float64), np.asarray(term, bool), np.asarray(trunc, bool), true_next

    def state(self) -> dict:
        """What a checkpoint keeps: the actions so far, (steps, num_envs, action_dim)."""
        n, a = len(self.reset_seeds), self.meta.action_dim
        return {"env_actions": np.stack(self.actions) if self.actions else np.zeros((0, n, a), np.float32)}

    def restore(self, state: dict, on_step: Callable | None = None) -> np.ndarray:
        """Reset and replay a checkpoint's actions; returns the current observation.
        `on_step(obs, action, reward, term, trunc, true_next)` sees every replayed step (e.g. to
        rebuild a trajectory that was running)."""
        obs = self.reset()
        for actions in np.asarray(state["env_actions"], np.float32):
            prev = obs
            obs, reward, term, trunc, true_next = self.step(actions)
            if on_step is not None:
                on_step(prev, actions, reward, term, trunc, true_next)
        return obs

    def close(self) -> None:
        self.envs.close()
