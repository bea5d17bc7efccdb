"""Soft Actor-Critic (Haarnoja et al. 2018) to train the behaviour policies of the local datasets.

D4RL trained SAC on each robot and collected its datasets from snapshots of that run; we do the
same on Gymnasium's MuJoCo v5 robots. One environment, one update per environment step, twin
critics, automatic entropy tuning, 256-256 networks (CleanRL's `sac_continuous_action.py` shape,
but with one fused jitted call per step: store the transition, update, act).

Training is resumable: every `--checkpoint-every` steps it saves the train state, the replay
buffer and the RNG under `--work-dir` (outside the repo), and a new run continues from the latest.
Every `--snapshot-every` steps it saves the actor (flax msgpack) with its deterministic return over
10 evaluation episodes. `--ship` then copies the policies the datasets need into
`datasets/policies/` and writes `manifest.json`.

    python datasets/sac.py --robot hopper --total-steps 1000000      # train (resumes)
    python datasets/sac.py --robot hopper --ship                     # pick and ship policies
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import flax.linen as nn
import gymnasium as gym
import jax
import jax.numpy as jnp
import numpy as np
import optax
import tyro
from flax import serialization

sys.path.insert(0, str(Path(__file__).resolve().parent))
from policy import (  # noqa: E402
    LOG_STD_MAX,
    LOG_STD_MIN,
    MANIFEST,
    POLICY_DIR,
    ROBOTS,
    normalized_score,
    silence_mujoco,
)


@dataclass(frozen=True)
class Args:
    robot: str = "hopper"
    """halfcheetah, hopper or walker2d"""
    total_steps: int = 1_000_000
    """environment steps (= updates after the warm-up)"""
    seed: int = 0
    """training seed"""
    learning_starts: int = 5_000
    """uniformly random actions (and no updates) for this many steps"""
    buffer_size: int = 1_000_000
    """replay buffer capacity"""
    batch_size: int = 256
    """batch size per update"""
    hidden: int = 256
    """width of the two hidden layers of every network"""
    lr: float = 3e-4
    """Adam learning rate of actor, critics and temperature"""
    gamma: float = 0.99
    """discount"""
    tau: float = 0.005
    """Polyak rate of the target critics"""
    snapshot_every: int = 10_000
    """save the actor and its evaluation return every this many steps"""
    checkpoint_every: int = 50_000
    """save everything needed to resume every this many steps"""
    eval_episodes: int = 10
    """deterministic evaluation episodes per snapshot"""
    work_dir: str = "~/.cache/jaxorl/sac"
    """where checkpoints and snapshots live (outside the repo)"""
    ship: bool = False
    """do not train: copy random/replay/medium/expert policies to datasets/policies"""
    medium_fraction: float = 1 / 3
    """medium = first snapshot whose return reaches this fraction of the expert's (D4RL)"""
    max_replay_snapshots: int = 10
    """medium-replay is collected from at most this many snapshots, evenly spaced from init to medium"""


class Actor(nn.Module):
    action_dim: int
    hidden: int

    @nn.compact
    def __call__(self, obs):
        h = nn.relu(nn.Dense(self.hidden)(obs))
        h = nn.relu(nn.Dense(self.hidden)(h))
        mean = nn.Dense(self.action_dim, name="mean")(h)
        raw = nn.Dense(self.action_dim, name="log_std")(h)
        log_std = LOG_STD_MIN + 0.5 * (LOG_STD_MAX - LOG_STD_MIN) * (jnp.tanh(raw) + 1.0)
        return mean, log_std


class DoubleCritic(nn.Module):
    hidden: int

    @nn.compact
    def __call__(self, obs, action):
        x = jnp.concatenate([obs, action], -1)
        qs = []
        for _ in range(2):
            h = nn.relu(nn.Dense(self.hidden)(x))
            h = nn.relu(nn.Dense(self.hidden)(h))
            qs.append(nn.Dense(1)(h)[..., 0])
        return jnp.stack(qs)  # (2, batch)


class TrainState(NamedTuple):
    actor: dict
    critic: dict
    target_critic: dict
    log_alpha: jax.Array
    actor_opt: optax.OptState
    critic_opt: optax.OptState
    alpha_opt: optax.OptState


class Buffer:
    """Replay buffer in host memory; batches are drawn with numpy and passed to the jitted step
    (a device-resident buffer of 1M rows cost a copy per step inside the fused call on CPU)."""

    FIELDS = ("obs", "actions", "rewards", "next_obs", "terminals")

    def __init__(self, capacity, obs_dim, action_dim):
        self.obs = np.zeros((capacity, obs_dim), np.float32)
        self.actions = np.zeros((capacity, action_dim), np.float32)
        self.rewards = np.zeros(capacity, np.float32)
        self.next_obs = np.zeros((capacity, obs_dim), np.float32)
        self.terminals = np.zeros(capacity, np.float32)
        self.capacity, self.size, self.ptr = capacity, 0, 0

    def add(self, obs, action, reward, next_obs, terminal):
        i = self.ptr
        self.obs[i], self.actions[i], self.rewards[i] = obs, action, reward
        self.next_obs[i], self.terminals[i] = next_obs, terminal
        self.ptr, self.size = (i + 1) % self.capacity, min(self.size + 1, self.capacity)

    def sample(self, rng, batch_size):
        idx = rng.integers(0, self.size, batch_size)
        return tuple(getattr(self, f)[idx] for f in self.FIELDS)


def sample_action(actor, params, obs, key):
    mean, log_std = actor.apply(params, obs)
    std = jnp.exp(log_std)
    pre = mean + std * jax.random.normal(key, mean.shape)
    action = jnp.tanh(pre)
    logp = jax.scipy.stats.norm.logpdf(pre, mean, std) - jnp.log(1 - action**2 + 1e-6)
    return action, logp.sum(-1)


def make_fns(args: Args, obs_dim: int, action_dim: int):
    actor, critic = Actor(action_dim, args.hidden), DoubleCritic(args.hidden)
    opt = optax.adam(args.lr)
    target_entropy = -float(action_dim)

    def init(key):
        k1, k2 = jax.random.split(key)
        obs, act = jnp.zeros((1, obs_dim)), jnp.zeros((1, action_dim))
        a_params = actor.init(k1, obs)
        c_params = critic.init(k2, obs, act)
        log_alpha = jnp.zeros(())
        return TrainState(
            a_params,
            c_params,
            jax.tree_util.tree_map(jnp.copy, c_params),
            log_alpha,
            opt.init(a_params),
            opt.init(c_params),
            opt.init(log_alpha),
        )

    def update(s: TrainState, batch, key):
        obs, act, rew, nobs, term = batch
        k_next, k_pi = jax.random.split(key)
        alpha = jnp.exp(s.log_alpha)

        next_a, next_logp = sample_action(actor, s.actor, nobs, k_next)
        next_q = critic.apply(s.target_critic, nobs, next_a).min(0) - alpha * next_logp
        target = rew + args.gamma * (1.0 - term) * next_q

        def critic_loss(p):
            q = critic.apply(p, obs, act)
            return ((q - target) ** 2).mean(1).sum(), q.mean()

        (c_loss, q_mean), c_grad = jax.value_and_grad(critic_loss, has_aux=True)(s.critic)
        c_upd, critic_opt = opt.update(c_grad, s.critic_opt)
        critic_params = optax.apply_updates(s.critic, c_upd)

        def actor_loss(p):
            a, logp = sample_action(actor, p, obs, k_pi)
            q = critic.apply(critic_params, obs, a).min(0)
            return (alpha * logp - q).mean(), logp.mean()

        (a_loss, logp), a_grad = jax.value_and_grad(actor_loss, has_aux=True)(s.actor)
        a_upd, actor_opt = opt.update(a_grad, s.actor_opt)
        actor_params = optax.apply_updates(s.actor, a_upd)

        def alpha_loss(la):
            return -la * jax.lax.stop_gradient(logp + target_entropy)

        al_grad = jax.grad(alpha_loss)(s.log_alpha)
        al_upd, alpha_opt = opt.update(al_grad, s.alpha_opt)
        log_alpha = optax.apply_updates(s.log_alpha, al_upd)
        target = optax.incremental_update(critic_params, s.target_critic, args.tau)
        metrics = {"critic_loss": c_loss, "actor_loss": a_loss, "alpha": alpha, "q": q_mean}
        new = TrainState(actor_params, critic_params, target, log_alpha, actor_opt, critic_opt, alpha_opt)
        return new, metrics

    @jax.jit
    def act_deterministic(params, obs):
        return jnp.tanh(actor.apply(params, obs)[0])

    def step(s, batch, act_obs, key):
        # One call per environment step: update, then act for the next step.
        k_up, k_act = jax.random.split(key)
        s, metrics = update(s, batch, k_up)
        new_action = sample_action(actor, s.actor, act_obs[None], k_act)[0][0]
        return s, new_action, metrics

    return init, act_deterministic, jax.jit(step, donate_argnums=(0,))


def evaluate(env_id, act_deterministic, params, episodes, seed=10_000):
    """Deterministic return over `episodes` episodes, all run side by side (one batched act)."""
    envs = [gym.make(env_id) for _ in range(episodes)]
    obs = np.stack([e.reset(seed=seed + j)[0] for j, e in enumerate(envs)])
    returns, done = np.zeros(episodes), np.zeros(episodes, bool)
    while not done.all():
        actions = np.asarray(act_deterministic(params, obs))
        for j, e in enumerate(envs):
            if done[j]:
                continue
            o, r, term, trunc, _ = e.step(actions[j])
            obs[j], returns[j] = o, returns[j] + r
            done[j] = term or trunc
    for e in envs:
        e.close()
    return returns


def atomic_write_bytes(path: Path, data: bytes):
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def save_checkpoint(path: Path, state, buf: Buffer, key, rng, step, episode_log):
    tmp = path.with_name(path.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    (tmp / "state.msgpack").write_bytes(serialization.to_bytes(state))
    np.savez(tmp / "buffer.npz", **{f: getattr(buf, f)[: buf.size] for f in Buffer.FIELDS}, ptr=buf.ptr)
    meta = {
        "step": step,
        "key": np.asarray(jax.random.key_data(key)).tolist(),
        "rng": rng.bit_generator.state,
        "episodes": episode_log,
    }
    (tmp / "meta.json").write_text(json.dumps(meta))
    if path.exists():
        shutil.rmtree(path)
    os.replace(tmp, path)


def train(args: Args):
    env_id = ROBOTS[args.robot]
    work = Path(args.work_dir).expanduser() / args.robot
    (work / "snapshots").mkdir(parents=True, exist_ok=True)
    silence_mujoco()
    env = gym.make(env_id)
    obs_dim, action_dim = env.observation_space.shape[0], env.action_space.shape[0]
    init, act_det, step_fn = make_fns(args, obs_dim, action_dim)

    key = jax.random.key(args.seed)
    key, k_init = jax.random.split(key)
    state = init(k_init)
    buf = Buffer(args.buffer_size, obs_dim, action_dim)
    rng = np.random.default_rng(args.seed)
    start, episode_log = 0, []
    ckpt = work / "checkpoint"
    if ckpt.exists():
        meta = json.loads((ckpt / "meta.json").read_text())
        state = serialization.from_bytes(state, (ckpt / "state.msgpack").read_bytes())
        data = np.load(ckpt / "buffer.npz")
        n = len(data["rewards"])
        for f in Buffer.FIELDS:
            getattr(buf, f)[:n] = data[f]
        buf.size, buf.ptr = n, int(data["ptr"])
        key = jax.random.wrap_key_data(jnp.asarray(meta["key"], jnp.uint32))
        rng.bit_generator.state = meta["rng"]
        start, episode_log = meta["step"], meta["episodes"]
        print(f"resumed {args.robot} from step {start} (buffer {n}); the running episode restarts", flush=True)

    log_path = work / "snapshots.jsonl"

    def snapshot(t):
        rets = evaluate(env_id, act_det, state.actor, args.eval_episodes)
        atomic_write_bytes(work / "snapshots" / f"step_{t:07d}.msgpack", serialization.to_bytes(state.actor["params"]))
        rec = {"step": t, "return_mean": float(rets.mean()), "return_std": float(rets.std())}
        with open(log_path, "a") as f:
            f.write(json.dumps(rec) + "\n")
        return rec

    if start == 0:
        log_path.unlink(missing_ok=True)
        print(f"step 0: {snapshot(0)}", flush=True)

    obs, _ = env.reset(seed=args.seed * 100_003 + start)
    action = rng.uniform(-1, 1, action_dim).astype(np.float32)
    ep_ret, ep_len, t0, metrics = 0.0, 0, time.time(), {}
    for t in range(start + 1, args.total_steps + 1):
        next_obs, reward, term, trunc, _ = env.step(action)
        ep_ret, ep_len = ep_ret + reward, ep_len + 1
        act_obs = next_obs
        if term or trunc:
            episode_log.append([t, round(ep_ret, 2), ep_len])
            act_obs, _ = env.reset()
            ep_ret, ep_len = 0.0, 0
        buf.add(obs, action, reward, next_obs, float(term))
        if t <= args.learning_starts:
            action = rng.uniform(-1, 1, action_dim).astype(np.float32)
        else:
            key, k = jax.random.split(key)
            state, a, metrics = step_fn(state, buf.sample(rng, args.batch_size), act_obs, k)
            action = np.asarray(a)
        obs = act_obs
        if t % args.snapshot_every == 0:
            rec = snapshot(t)
            recent = [e[1] for e in episode_log[-10:]]
            sps = (t - start) / (time.time() - t0)
            m = {k: round(float(v), 3) for k, v in metrics.items()}
            print(
                f"step {t}: eval {rec['return_mean']:.1f} ± {rec['return_std']:.1f} "
                f"train {np.mean(recent) if recent else 0:.1f} | {sps:.0f} steps/s | {m}",
                flush=True,
            )
            if not all(np.isfinite(float(v)) for v in metrics.values()):
                raise FloatingPointError(f"non-finite SAC metrics at step {t}: {m}")
        if t % args.checkpoint_every == 0 or t == args.total_steps:
            save_checkpoint(ckpt, state, buf, key, rng, t, episode_log)
    print(f"done: {args.robot} trained to step {args.total_steps}", flush=True)


def replay_snapshots(snaps: list[dict], medium: dict, most: int) -> list[dict]:
    """Snapshots from initialization to medium in training order, thinned evenly to at most `most`
    (first and last kept) so the shipped files stay small."""
    upto = [s for s in snaps if s["step"] <= medium["step"]]
    if len(upto) <= most:
        return upto
    keep = sorted({int(round(i)) for i in np.linspace(0, len(upto) - 1, most)})
    return [upto[i] for i in keep]


def ship(args: Args):
    """Copy random (init), replay snapshots (up to medium), medium and expert into datasets/policies."""
    work = Path(args.work_dir).expanduser() / args.robot
    snaps = [json.loads(line) for line in (work / "snapshots.jsonl").read_text().splitlines()]
    # A snapshot log may list a step twice if training resumed before its file was written again.
    snaps = list({s["step"]: s for s in snaps}.values())
    snaps.sort(key=lambda s: s["step"])
    expert = snaps[-1]
    medium = next(s for s in snaps if s["return_mean"] >= args.medium_fraction * expert["return_mean"])
    out = POLICY_DIR / args.robot
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)

    def entry(s):
        name = f"{args.robot}/step_{s['step']:07d}.msgpack"
        shutil.copy(work / "snapshots" / f"step_{s['step']:07d}.msgpack", POLICY_DIR / name)
        return {
            "file": name,
            "step": s["step"],
            "return_mean": round(s["return_mean"], 2),
            "return_std": round(s["return_std"], 2),
            "normalized": round(normalized_score(args.robot, s["return_mean"]), 2),
        }

    manifest = json.loads(MANIFEST.read_text()) if MANIFEST.exists() else {}
    manifest[args.robot] = {
        "env_id": ROBOTS[args.robot],
        "training_steps": expert["step"],
        "random": entry(snaps[0]),
        "medium": entry(medium),
        "expert": entry(expert),
        "replay": [entry(s) for s in replay_snapshots(snaps, medium, args.max_replay_snapshots)],
    }
    atomic_write_bytes(MANIFEST, (json.dumps(manifest, indent=2) + "\n").encode())
    print(json.dumps(manifest[args.robot], indent=2))


if __name__ == "__main__":
    cli_args = tyro.cli(Args)
    if cli_args.robot not in ROBOTS:
        raise SystemExit(f"unknown robot {cli_args.robot!r}; choose one of {sorted(ROBOTS)}")
    ship(cli_args) if cli_args.ship else train(cli_args)
