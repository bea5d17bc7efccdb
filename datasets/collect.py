"""Episode collection with a shipped SAC actor, run in worker processes by `make.py`.

A chunk is a fixed list of episode indices run side by side with one batched numpy policy call per
step. Episode i of stream k resets with a seed derived from (seed, k, i) and draws its action noise
from its own generator, so the episodes do not depend on how chunks are spread over workers. The
policy call is `policy.act`, whose fixed-order arithmetic gives the same actions on every CPU (see
`policy.py`), so the episodes do not depend on the machine's BLAS or SIMD either.

Workers are started by `make.py` with `worker_init`, which makes a worker exit on its own once the
process that started it is gone (killed with SIGKILL, say), so no collection keeps running for a
build that no longer exists, and which gives it the build's `stop` event: once it is set, chunks
still queued return at once, so a finished build closes its pool gracefully instead of terminating
workers that may be writing a result (a SIGTERM then can leave the result pipe's lock held and hang
the pool's shutdown).
"""

from __future__ import annotations

import os
import signal
import threading
import time

import gymnasium as gym
import numpy as np
from policy import act, prepare, silence_mujoco

ORPHAN_POLL_S = 0.5


POLICIES: dict[str, dict] = {}  # name -> prepared actor parameters, set by worker_init
STOP = None  # the build's multiprocessing Event, set by worker_init


def worker_init(parent_pid: int, policies: dict[str, dict] | None = None, stop=None) -> None:
    """Pool initializer: keep the level's policies (tasks name them), ignore SIGINT (a Ctrl-C
    reaches the whole process group; the build process handles it and terminates its workers) and
    exit as soon as `parent_pid` is no longer this worker's parent."""
    global STOP
    POLICIES.update({name: prepare(params) for name, params in (policies or {}).items()})
    STOP = stop
    signal.signal(signal.SIGINT, signal.SIG_IGN)

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(ORPHAN_POLL_S)
        os._exit(1)

    if os.getppid() != parent_pid:
        os._exit(1)
    threading.Thread(target=watch, name="orphan-watchdog", daemon=True).start()
    import_renderer_quietly()


def import_renderer_quietly() -> None:
    """Import gymnasium's MuJoCo renderer (the first `gym.make` of a MuJoCo env would) with this
    process's stderr on /dev/null. Its `import glfw` probes each GLFW library in a `python -c`
    child that inherits stderr; a worker terminated mid-probe (a build interrupted as it starts)
    orphans that child, which then prints a BrokenPipeError traceback under the build's one line."""
    devnull, saved = os.open(os.devnull, os.O_WRONLY), os.dup(2)
    try:
        os.dup2(devnull, 2)
        import gymnasium.envs.mujoco.mujoco_rendering  # noqa: F401
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def episode_seeds(seed: int, stream: int, index: int) -> tuple[int, np.random.Generator]:
    ss = np.random.SeedSequence([seed, stream, index])
    reset_seed = int(ss.generate_state(1)[0])
    return reset_seed, np.random.default_rng(ss.spawn(1)[0])


def run_chunk(task: tuple) -> list[dict]:
    """task = (env_id, policy, seed, stream, indices, stochastic) -> one dict per episode, in order.
    `policy` is the name of a policy given to `worker_init`, or the actor parameters themselves."""
    env_id, policy, seed, stream, indices, stochastic = task
    if STOP is not None and STOP.is_set():
        return []  # the build has what it needs: a chunk left in the queue is not run
    params = POLICIES[policy] if isinstance(policy, str) else prepare(policy)
    silence_mujoco()
    n = len(indices)
    envs = [gym.make(env_id) for _ in range(n)]
    rngs, obs_lists, act_lists, rew_lists, term_lists = [], [], [], [], []
    obs = []
    for env, i in zip(envs, indices):
        reset_seed, rng = episode_seeds(seed, stream, i)
        o, _ = env.reset(seed=reset_seed)
        rngs.append(rng)
        obs.append(o)
        obs_lists.append([o])
        act_lists.append([])
        rew_lists.append([])
        term_lists.append([])
    obs = np.asarray(obs, np.float32)
    alive = np.ones(n, bool)
    truncated = np.zeros(n, bool)
    action_dim = envs[0].action_space.shape[0]
    while alive.any():
        live = np.flatnonzero(alive)
        noise = np.stack([rngs[j].standard_normal(action_dim) for j in live]) if stochastic else None
        actions = act(params, obs[live], noise)
        for a, j in zip(actions, live):
            o, r, term, trunc, _ = envs[j].step(a)
            obs[j] = o
            obs_lists[j].append(o)
            act_lists[j].append(a)
            rew_lists[j].append(r)
            term_lists[j].append(term)
            if term or trunc:
                alive[j] = False
                truncated[j] = trunc and not term
    for env in envs:
        env.close()
    episodes = []
    for j in range(n):
        T = len(rew_lists[j])
        term = np.zeros(T, bool)
        trunc = np.zeros(T, bool)
        term[-1] = term_lists[j][-1]
        trunc[-1] = truncated[j]
        episodes.append(
            {
                "observations": np.asarray(obs_lists[j], np.float64),
                "actions": np.asarray(act_lists[j], np.float32),
                "rewards": np.asarray(rew_lists[j], np.float64),
                "terminations": term,
                "truncations": trunc,
            }
        )
    return episodes
