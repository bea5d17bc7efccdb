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
        low, high = meta.action_space.low, meta.action_space.high
        while not done.all():
            rng, key = jax.random.split(rng)
            flat = meta.flatten_obs(obs).reshape(num_seeds, num_episodes, -1)
            actions, carry = policy(params, carry, flat, prev_reward, key)
            actions = np.clip(np.asarray(actions, np.float64).reshape(n, -1), low, high)
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
