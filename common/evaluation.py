"""Vectorized evaluation: every episode of every seed runs side by side, one batched policy call
per environment step.

    result = evaluate(meta, policy, params, num_episodes=10, seed=0)
    result.normalized  # (num_seeds, num_episodes)

`policy(params, carry, obs, prev_reward, rng) -> (actions, carry)` sees obs of shape
(num_seeds, num_episodes, obs_dim) and params stacked over seeds; build it with `jax.vmap` and jit
it. Episode j of every seed resets with `seed + j`, so all seeds face the same start states.

`video=PATH` also renders the first episode of the first seed (MuJoCo's offscreen renderer,
headless through MUJOCO_GL=egl or osmesa) into an MP4 at PATH; the scores are the same with or
without it. Where nothing can render or encode, it says so once and the evaluation goes on.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
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
    video: str | None = None  # the MP4 of episode 0 of seed 0, when one was asked for and written
    thumbnail: list | None = None  # a few of its frames, downsampled (uint8 HxWx3), for tensorboard


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
    video: str | Path | None = None,
) -> EvalResult:
    t0 = time.perf_counter()
    num_seeds = num_seeds_of(params)
    n = num_seeds * num_episodes
    recorder = VideoRecorder.open(meta, video) if video is not None else None
    makers = [meta.make_env for _ in range(n)]
    if recorder is not None:
        makers[0] = recorder.make_env
    envs = gym.vector.SyncVectorEnv(makers)
    try:
        obs, _ = envs.reset(seed=[seed + j for _ in range(num_seeds) for j in range(num_episodes)])
        if recorder is not None:
            recorder.capture(envs.envs[0])
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
            if recorder is not None and not done[0]:
                recorder.capture(envs.envs[0])
            done |= term | trunc
            prev_reward = np.asarray(reward, np.float32).reshape(num_seeds, num_episodes)
        written = recorder.finish() if recorder is not None else None
    finally:
        envs.close()
        if recorder is not None:
            recorder.abort()
    shape = (num_seeds, num_episodes)
    return EvalResult(
        returns.reshape(shape),
        meta.normalize(returns).reshape(shape),
        lengths.reshape(shape),
        success.reshape(shape) if has_success else None,
        time.perf_counter() - t0,
        written,
        recorder.thumbnail() if written else None,
    )


# --- Video ------------------------------------------------------------------------------------
VIDEO_SIZE = 256  # pixels, square: even sizes as H.264's yuv420p needs
_video_off: str | None = None  # why videos cannot be made in this process (said once)


def video_unavailable(reason: str) -> None:
    global _video_off
    if _video_off is None:
        print(f"warning: no video ({reason}); the run continues without video", file=sys.stderr, flush=True)
    _video_off = reason


def headless_gl() -> None:
    """Choose MuJoCo's headless renderer before MuJoCo is imported, unless the user chose one or
    there is a display: EGL, else OSMesa, whichever library the system has (MuJoCo fails at import
    when the chosen one is missing, so none is chosen then and rendering fails with its message)."""
    if "MUJOCO_GL" in os.environ or os.environ.get("DISPLAY"):
        return
    import ctypes.util

    for backend, library in (("egl", "EGL"), ("osmesa", "OSMesa")):
        if ctypes.util.find_library(library):
            os.environ["MUJOCO_GL"] = backend
            os.environ.setdefault("PYOPENGL_PLATFORM", backend)
            return


class VideoRecorder:
    """Streams rendered frames into an MP4 (PyAV, H.264) written atomically at `path`; keeps every
    4th frame at 64 pixels for a tensorboard thumbnail."""

    def __init__(self, meta: Meta, path: Path, av):
        self.meta, self.path, self.av = meta, Path(path), av
        self.tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        self.container = self.stream = None
        self.frames, self.small = 0, []

    @classmethod
    def open(cls, meta: Meta, path) -> VideoRecorder | None:
        if _video_off is not None:
            return None
        try:
            import av
        except ImportError:
            video_unavailable("PyAV is not installed: pip install -e '.[video]'")
            return None
        return cls(meta, path, av)

    def make_env(self) -> gym.Env:
        try:
            try:
                return self.meta.make_env(render_mode="rgb_array", width=VIDEO_SIZE, height=VIDEO_SIZE)
            except TypeError:  # an environment without width/height arguments
                return self.meta.make_env(render_mode="rgb_array")
        except Exception as e:
            self.failed(e)
            return self.meta.make_env()

    def failed(self, e: Exception) -> None:
        """No GL context, no display, an encoder missing: say so once, go on without video."""
        first = (str(e).strip().splitlines() or [""])[0]
        video_unavailable(
            f"{type(e).__name__}: {first}; headless rendering needs MUJOCO_GL=egl (or osmesa) and "
            "the system's EGL (or OSMesa) library, e.g. apt-get install libegl1 libgl1-mesa-dri"
        )
        self.abort()

    def capture(self, env: gym.Env) -> None:
        if self.tmp is None:
            return
        try:
            frame = np.asarray(env.render(), np.uint8)
            if self.container is None:
                h, w = frame.shape[0] // 2 * 2, frame.shape[1] // 2 * 2
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self.container = self.av.open(str(self.tmp), mode="w", format="mp4")
                fps = int(round(env.metadata.get("render_fps") or 30))
                self.stream = self.container.add_stream("h264", rate=fps)
                self.stream.width, self.stream.height, self.stream.pix_fmt = w, h, "yuv420p"
            frame = np.ascontiguousarray(frame[: self.stream.height, : self.stream.width])
            picture = self.av.VideoFrame.from_ndarray(frame, format="rgb24")
            self.container.mux(self.stream.encode(picture))
            if self.frames % 4 == 0:
                step = max(1, frame.shape[0] // 64)
                self.small.append(frame[::step, ::step])
            self.frames += 1
        except Exception as e:
            self.failed(e)

    def finish(self) -> str | None:
        if self.container is None or self.tmp is None:
            return None
        try:
            self.container.mux(self.stream.encode())  # flush the encoder
            self.container.close()
            self.container = None
            os.replace(self.tmp, self.path)
        except Exception as e:  # an encoder or disk error costs the video, not the evaluation
            self.failed(e)
            return None
        self.tmp = None
        return str(self.path)

    def abort(self) -> None:
        """Drop an unfinished video (an error, an interrupted evaluation): no torn file is left."""
        if self.container is not None:
            try:
                self.container.close()
            except Exception:
                pass
            self.container = None
        if self.tmp is not None:
            self.tmp.unlink(missing_ok=True)
            self.tmp = None

    def thumbnail(self) -> list:
        return self.small[:: max(1, len(self.small) // 50)]


class OnlineEnvs:
    """One environment per seed for an online phase, resumable exactly.

    It remembers its reset seeds, every action it was given and where each episode ended, so a
    resumed run rebuilds each environment's state (MuJoCo's state, elapsed steps, the env's RNG, a
    maze's goal) by replay, which needs nothing environment-specific: MuJoCo is deterministic on one
    machine. A reset draws the same random numbers whatever came before it, so only the episodes
    running at the checkpoint are replayed (an environment gets its earlier resets without their
    steps); if that does not give back the checkpoint's observations, everything is replayed from the
    first reset. Gymnasium's SAME_STEP autoreset: an ended episode's true last observation is
    returned as `true_next`, the reset one as `obs`.
    """

    def __init__(self, meta: Meta, reset_seeds: list[int]):
        self.meta, self.reset_seeds = meta, list(reset_seeds)
        self.envs = gym.vector.SyncVectorEnv(
            [meta.make_env for _ in reset_seeds], autoreset_mode=gym.vector.AutoresetMode.SAME_STEP
        )
        self.actions: list[np.ndarray] = []  # every step's actions, (num_envs, action_dim) float32 in [-1, 1]
        self.ended: list[np.ndarray] = []  # every step's terminated | truncated, (num_envs,) bool
        self.obs: np.ndarray | None = None  # the current observations

    def reset(self) -> np.ndarray:
        self.actions, self.ended = [], []
        self.obs = self.meta.flatten_obs(self.envs.reset(seed=self.reset_seeds)[0])
        return self.obs

    def step(self, actions) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(obs, reward, terminated, truncated, true_next) after `actions` (in [-1, 1])."""
        actions = np.asarray(actions, np.float32)
        self.actions.append(actions)
        obs, reward, term, trunc, info = self.envs.step(self.meta.to_env_action(actions))
        obs = self.meta.flatten_obs(obs)
        true_next = obs.copy()
        for i in np.flatnonzero(term | trunc):
            true_next[i] = self.meta.flatten_obs(info["final_obs"][i])
        self.ended.append(np.asarray(term | trunc, bool))
        self.obs = obs
        return obs, np.asarray(reward, np.float64), np.asarray(term, bool), np.asarray(trunc, bool), true_next

    def state(self) -> dict:
        """What a checkpoint keeps: the actions so far (steps, num_envs, action_dim), where episodes
        ended (steps, num_envs) and the current observations."""
        n, a = len(self.reset_seeds), self.meta.action_dim
        if not self.actions:
            return {"env_actions": np.zeros((0, n, a), np.float32)}
        return {"env_actions": np.stack(self.actions), "env_ended": np.stack(self.ended), "env_obs": self.obs}

    def restore(self, state: dict, on_step: Callable | None = None) -> np.ndarray:
        """Rebuild the environments of a checkpoint; returns the current observation.
        `on_step(obs, action, reward, term, trunc, true_next)` sees every replayed step, at least
        every step of the episodes running at the checkpoint (e.g. to rebuild their trajectories)."""
        actions = np.asarray(state["env_actions"], np.float32)
        if "env_ended" in state and len(actions):
            seen: list[tuple] = []
            obs = self._replay_running(actions, np.asarray(state["env_ended"], bool), lambda *step: seen.append(step))
            if np.array_equal(obs, state["env_obs"]):
                for step in seen if on_step is not None else ():
                    on_step(*step)
                return obs
        self.reset()  # a checkpoint without episode ends, or one the shortcut does not rebuild
        return self._replay(actions, on_step or (lambda *step: None))

    def _replay(self, actions: np.ndarray, on_step: Callable) -> np.ndarray:
        """Step the vector env through `actions` from where it stands, each step shown to `on_step`."""
        obs = self.obs
        for a in actions:
            prev = obs
            obs, reward, term, trunc, true_next = self.step(a)
            on_step(prev, a, reward, term, trunc, true_next)
        return obs

    def _replay_running(self, actions: np.ndarray, ended: np.ndarray, on_step: Callable) -> np.ndarray:
        """The vector env is replayed from step t0, where the earliest of the running episodes began;
        before it, each environment gets its resets and the steps of its own episode running at t0."""
        t0 = min(int(np.flatnonzero(e)[-1]) + 1 if e.any() else 0 for e in ended.T)
        self.reset()
        for i, env in enumerate(self.envs.envs):  # SAME_STEP autoreset resets an env with no seed
            done_before = np.flatnonzero(ended[:t0, i])
            for _ in done_before:
                self.obs[i] = self.meta.flatten_obs(env.reset()[0])
            start = int(done_before[-1]) + 1 if len(done_before) else 0
            for a in actions[start:t0, i]:
                self.obs[i] = self.meta.flatten_obs(env.step(self.meta.to_env_action(a))[0])
        self.actions, self.ended = list(actions[:t0]), list(ended[:t0])
        return self._replay(actions[t0:], on_step)

    def close(self) -> None:
        self.envs.close()
