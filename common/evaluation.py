"""Vectorized evaluation: every episode of every seed runs side by side, one batched policy call
per environment step; only running episodes are stepped, and on machines of more than 2 cores the
envs step in worker processes (JAXORL_EVAL_WORKERS=N sets how many; 0 keeps them here).

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
import pickle
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import gymnasium as gym
import jax
import numpy as np

from common.data import Meta, UserError


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
    seeds = [seed + j for _ in range(num_seeds) for j in range(num_episodes)]
    workers = 0 if recorder is not None else eval_workers(n)
    envs = pooled_envs(meta, n, workers) if workers else LocalEnvs(meta, n, recorder)
    try:
        # Only running episodes are stepped: a vector env steps every env until the last episode
        # ends, which doubled the env steps of evaluations whose episodes end at different times.
        flat = envs.reset(seeds)
        rng = jax.random.key(seed) if rng is None else rng
        returns, lengths = np.zeros(n), np.zeros(n, np.int64)
        done, success = np.zeros(n, bool), np.zeros(n, bool)
        has_success = False
        reward = np.zeros(n)
        while not done.all():
            rng, key = jax.random.split(rng)
            prev_reward = reward.astype(np.float32).reshape(num_seeds, num_episodes)
            actions, carry = policy(params, carry, flat.reshape(num_seeds, num_episodes, -1), prev_reward, key)
            actions = meta.to_env_action(np.asarray(actions).reshape(n, -1))
            running = np.flatnonzero(~done)  # an ended episode's row stays as it ended, counted no more
            obs, reward_running, ended, succeeded = envs.step(running, actions[running])
            flat = flat.copy()  # a new array each step: the policy may keep the one it was given
            flat[running] = obs
            reward = np.zeros(n)
            reward[running] = reward_running
            returns[running] += reward_running
            lengths[running] += 1
            if succeeded is not None:
                has_success = True
                success[running] |= succeeded
            done[running] = ended
        written = recorder.finish() if recorder is not None else None
    except BaseException:
        if workers:
            drop_pool()  # a worker may have died or stopped mid-step: the next evaluation starts new ones
        raise
    finally:
        if not workers:
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


class LocalEnvs:
    """n evaluation envs stepped in this process (env 0 through the video recorder, if any)."""

    def __init__(self, meta: Meta, n: int, recorder: VideoRecorder | None = None):
        self.meta, self.recorder, self.envs = meta, recorder, []
        try:
            for i in range(n):
                self.envs.append(recorder.make_env() if i == 0 and recorder is not None else meta.make_env())
        except BaseException:
            self.close()
            raise

    def reset(self, seeds: list[int]) -> np.ndarray:
        flat = np.stack([self.meta.flatten_obs(env.reset(seed=s)[0]) for env, s in zip(self.envs, seeds)])
        if self.recorder is not None:
            self.recorder.capture(self.envs[0])
        return flat

    def step(self, index: np.ndarray, actions: np.ndarray):
        """Step envs `index` with `actions`: their flat observations, rewards, ended (terminated or
        truncated) and success flags (None where the env reports none)."""
        flat, reward, ended, success = [], np.zeros(len(index)), np.zeros(len(index), bool), []
        for k, (i, action) in enumerate(zip(index, actions)):
            obs, reward[k], term, trunc, info = self.envs[i].step(action)
            flat.append(self.meta.flatten_obs(obs))
            ended[k] = term or trunc
            success.append(info.get("success"))
        if self.recorder is not None and len(index) and index[0] == 0:
            self.recorder.capture(self.envs[0])
        has_success = any(x is not None for x in success)
        return np.stack(flat), reward, ended, np.array([bool(x) for x in success]) if has_success else None

    def close(self) -> None:
        for env in self.envs:
            env.close()


# Evaluation envs in worker processes: on a machine with spare cores (a GPU machine's host, where
# stepping MuJoCo on one core is most of an evaluation) the envs are split into one block per worker.
# Results are identical to stepping them here: the same seeds and actions reach the same envs.
def eval_workers(n: int) -> int:
    """Worker processes for n envs: JAXORL_EVAL_WORKERS if set (0: none), else one per core but one,
    at least 4 envs each, on machines of more than 2 cores; 0 (step them in this process) otherwise."""
    value = os.environ.get("JAXORL_EVAL_WORKERS")
    if value is not None:
        if not value.strip().isdigit():
            raise UserError(f"JAXORL_EVAL_WORKERS={value!r}: give a whole number of worker processes (0: none)")
        return min(int(value), n)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    workers = min(cores - 1, n // 4)
    return workers if cores > 2 and workers >= 2 else 0


def serve_envs() -> None:
    """An evaluation worker process: LocalEnvs for the (meta, n) it is sent first, then each
    (method, args) call answered, all pickled over stdin/stdout, until stdin closes."""
    answers = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # anything the envs print goes to stderr, never into the answers
    envs = None
    try:
        meta, n = pickle.load(sys.stdin.buffer)
        envs = LocalEnvs(meta, n)
        pickle.dump(None, answers)
        answers.flush()
        while True:
            method, args = pickle.load(sys.stdin.buffer)
            pickle.dump(getattr(envs, method)(*args), answers)
            answers.flush()
    except (EOFError, KeyboardInterrupt, BrokenPipeError):
        pass
    except Exception as e:  # the parent raises it
        pickle.dump(RuntimeError(f"evaluation worker: {type(e).__name__}: {e}"), answers)
        answers.flush()
    finally:
        if envs is not None:
            envs.close()


class PooledEnvs:
    """LocalEnvs' reset and step over worker processes, each holding a contiguous block of the envs.
    Plain subprocesses (not multiprocessing, whose spawn re-imports the caller's main script and
    whose fork is unsafe under JAX's threads)."""

    def __init__(self, meta: Meta, n: int, workers: int):
        bounds = np.linspace(0, n, workers + 1).astype(int)
        self.blocks = list(zip(bounds[:-1], bounds[1:]))
        root = str(Path(__file__).resolve().parents[1])  # where `common` is importable from
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
        command = [sys.executable, "-c", "from common.evaluation import serve_envs; serve_envs()"]
        self.procs = []
        try:
            for lo, hi in self.blocks:
                proc = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env)
                self.procs.append(proc)
                self._send(proc, (meta, int(hi - lo)))
            for proc in self.procs:
                self._receive(proc)
        except BaseException:
            self.close()
            raise

    def _send(self, proc, message) -> None:
        try:
            pickle.dump(message, proc.stdin)
            proc.stdin.flush()
        except (BrokenPipeError, OSError):
            raise RuntimeError("an evaluation worker process died (its error is above)") from None

    def _receive(self, proc):
        try:
            out = pickle.load(proc.stdout)
        except (EOFError, pickle.UnpicklingError):
            raise RuntimeError("an evaluation worker process died (its error is above)") from None
        if isinstance(out, Exception):
            raise out
        return out

    def reset(self, seeds: list[int]) -> np.ndarray:
        for (lo, hi), proc in zip(self.blocks, self.procs):
            self._send(proc, ("reset", (seeds[lo:hi],)))
        return np.concatenate([self._receive(proc) for proc in self.procs])

    def step(self, index: np.ndarray, actions: np.ndarray):
        asked = []
        for (lo, hi), proc in zip(self.blocks, self.procs):
            mine = (index >= lo) & (index < hi)
            if mine.any():
                self._send(proc, ("step", (index[mine] - lo, actions[mine])))
                asked.append(proc)
        parts = [self._receive(proc) for proc in asked]
        flat, reward, ended = (np.concatenate([p[k] for p in parts]) for k in range(3))
        has_success = any(p[3] is not None for p in parts)
        success = np.concatenate([p[3] if p[3] is not None else np.zeros(len(p[1]), bool) for p in parts])
        return flat, reward, ended, success if has_success else None

    def close(self) -> None:
        for proc in self.procs:
            try:
                proc.stdin.close()
            except OSError:
                pass
        for proc in self.procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            proc.stdout.close()


_pool: tuple[tuple, PooledEnvs] | None = None  # kept between evaluations of a run: starting workers takes seconds


def pooled_envs(meta: Meta, n: int, workers: int) -> PooledEnvs:
    global _pool
    key = (meta.dataset_id, meta.fingerprint, n, workers)
    if _pool is None or _pool[0] != key:
        drop_pool()
        _pool = (key, PooledEnvs(meta, n, workers))
    return _pool[1]


def drop_pool() -> None:
    global _pool
    if _pool is not None:
        _pool[1].close()
        _pool = None


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
