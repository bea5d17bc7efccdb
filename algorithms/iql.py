"""Implicit Q-Learning (IQL): Kostrikov, Nair and Levine, "Offline Reinforcement Learning with
Implicit Q-Learning", ICLR 2022. https://arxiv.org/abs/2110.06169

IQL never queries the critic on actions outside the dataset. A value network V(s) is fit by
expectile regression to the target critic's Q(s, a) on dataset actions, so with expectile tau > 0.5
it approximates a maximum over in-support actions; Q bootstraps from V(s'); the policy is
extracted by advantage-weighted regression, weights exp(beta * (Q - V)) clipped at 100.

Follows the official code (ikostrikov/implicit_q_learning): the update order V -> actor -> Q ->
Polyak, the actor and V reading the target critic, a Gaussian policy with tanh on the mean only
and a state-independent log-std, reward scaling 1000 / (max - min episode return) on locomotion,
r - 1 on AntMaze, cosine actor learning-rate decay offline (a resumed run whose larger budget
changes it says so), deterministic evaluation. PointMaze (not in the paper) uses the AntMaze
preset: a sparse goal-reaching task, this repo's choice.

    python algorithms/iql.py                                   # local/hopper/medium-v0, paper budget
    python algorithms/iql.py --dataset local/hopper/medium-v0 --num-seeds 5 --total-steps 100000
    python algorithms/iql.py --dataset local/pointmaze/umaze-sparse-v0 --online-steps 100000
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from common.data import Meta, load_dataset
from common.evaluation import OnlineEnvs, default_eval_episodes, evaluate
from common.logging import RunLogger, cli, first_nonfinite
from common.members import member_hyper, member_labels, replicate, shard, sweep_points, tile, vmap_members


@dataclass(frozen=True)
class Args:
    # --- Experiment ---
    dataset: str = "local/hopper/medium-v0"
    """Minari dataset id, or a local/... id built on first use"""
    seed: int = 0
    """first seed; seeds seed..seed+num_seeds-1 are trained together"""
    num_seeds: int = 1
    """independent seeds trained in one program with jax.vmap"""
    out_dir: str = "runs"
    """root of the run directories"""
    no_log: bool = False
    """no tensorboard events (tests)"""
    resume: str | None = None
    """a run directory to continue from its checkpoint, with its own config (flags may only extend the budget)"""
    debug: bool = False
    """show the Python traceback of an error instead of one line"""
    capture_video: bool = False
    """at each evaluation, render episode 0 of the first seed to RUN_DIR/videos/ (MP4) and tensorboard"""
    track: bool = False
    """also send the scalars, config and videos to Weights & Biases (pip install -e '.[track]')"""
    eval_only: str | None = None
    """evaluate the policy of this run directory (its config and checkpoint) without training"""
    # --- Training ---
    total_steps: int = 1_000_000
    """offline gradient updates (the paper's 1M)"""
    online_steps: int = 0
    """online environment steps after the offline phase, one update each (0: offline only)"""
    eval_every: int = 5_000
    """updates (offline) or environment steps (online) between evaluations"""
    eval_episodes: int | None = None
    """evaluation episodes per seed (None: 10 on locomotion, 100 on mazes)"""
    batch_size: int = 256
    """transitions per update per seed"""
    hidden_dims: tuple[int, ...] = (256, 256)
    """hidden sizes of the actor, critic and value MLPs"""
    # --- IQL ---
    expectile: float | None = None
    """expectile tau of the value loss (None: the dataset's preset: 0.7 locomotion, 0.9 mazes)"""
    beta: float | None = None
    """inverse temperature of the advantage weights (None: preset 3 locomotion, 10 mazes, 0.5 adroit)"""
    dropout: float | None = None
    """actor dropout rate (None: preset, 0.1 on Adroit/Kitchen, else none)"""
    discount: float = 0.99
    """discount gamma"""
    tau: float = 0.005
    """Polyak rate of the target critic"""
    actor_lr: float = 3e-4
    """actor learning rate (cosine-decayed to 0 over total_steps when offline only)"""
    critic_lr: float = 3e-4
    """critic learning rate"""
    value_lr: float = 3e-4
    """value learning rate"""
    exploration_temperature: float = 1.0
    """scale of the policy std when acting online"""
    sweep: tuple[str, ...] = ()
    """hyperparameter grid trained with the seeds as one program, e.g. --sweep expectile=0.7,0.9 beta=3,10"""


# Presets per domain, from the official configs (configs/{mujoco,antmaze,kitchen}_config.py).
PRESETS = {
    "locomotion": dict(expectile=0.7, beta=3.0, dropout=0.0),
    "antmaze": dict(expectile=0.9, beta=10.0, dropout=0.0),
    "pointmaze": dict(expectile=0.9, beta=10.0, dropout=0.0),
    "adroit": dict(expectile=0.7, beta=0.5, dropout=0.1),
    "kitchen": dict(expectile=0.7, beta=0.5, dropout=0.1),
}
# Refinements per (robot, level): none, since the official code tunes per domain only (one config
# for every locomotion set, one for every AntMaze set). A later per-dataset choice goes here.
DATASET_PRESETS: dict[tuple[str, str], dict] = {}
LOG_STD_MIN, LOG_STD_MAX = -5.0, 2.0
ACTION_EPS = 1e-5  # the official code clips dataset actions to +-(1 - 1e-5)
PAPER_STEPS = (1_000_000, 0)
SWEEPABLE = ("expectile", "beta", "discount", "tau")  # the traced hyperparameters (Hyper)


def validate(args: Args) -> None:
    sweep_points(args.sweep, args, SWEEPABLE)


def resolve(args: Args, meta: Meta) -> Args:
    """Fill the None fields from the dataset's preset (domain, then robot and level); an explicit
    flag always wins."""
    preset = {**PRESETS[meta.domain], **DATASET_PRESETS.get((meta.robot, meta.level), {})}
    preset["eval_episodes"] = default_eval_episodes(meta.domain)
    return dataclasses.replace(args, **{k: v for k, v in preset.items() if getattr(args, k) is None})


# --- Networks ---------------------------------------------------------------------------------
def default_init(scale: float = np.sqrt(2)):
    return nn.initializers.orthogonal(scale)


class MLP(nn.Module):
    dims: tuple[int, ...]
    activate_final: bool = False
    dropout: float = 0.0

    @nn.compact
    def __call__(self, x, training: bool = False):
        for i, d in enumerate(self.dims):
            x = nn.Dense(d, kernel_init=default_init())(x)
            if i + 1 < len(self.dims) or self.activate_final:
                x = nn.relu(x)
                if self.dropout > 0:
                    x = nn.Dropout(self.dropout)(x, deterministic=not training)
        return x


class Critic(nn.Module):
    """One Q network; the twin critics are two of these, applied as one vmapped call (see make_agent)."""

    hidden_dims: tuple[int, ...]

    @nn.compact
    def __call__(self, obs, action):
        return MLP((*self.hidden_dims, 1))(jnp.concatenate([obs, action], -1))[..., 0]


class ValueNet(nn.Module):
    hidden_dims: tuple[int, ...]

    @nn.compact
    def __call__(self, obs):
        return MLP((*self.hidden_dims, 1))(obs)[..., 0]


class Actor(nn.Module):
    """Gaussian with tanh on the mean only and a state-independent log-std (official IQL)."""

    hidden_dims: tuple[int, ...]
    action_dim: int
    dropout: float = 0.0

    @nn.compact
    def __call__(self, obs, training: bool = False):
        h = MLP(self.hidden_dims, activate_final=True, dropout=self.dropout)(obs, training)
        mean = jnp.tanh(nn.Dense(self.action_dim, kernel_init=default_init())(h))
        log_std = self.param("log_std", nn.initializers.zeros, (self.action_dim,))
        return mean, jnp.clip(log_std, LOG_STD_MIN, LOG_STD_MAX)


class TrainState(NamedTuple):
    """Everything one seed trains."""

    actor: dict
    critic: dict
    target_critic: dict
    value: dict
    actor_opt: optax.OptState
    critic_opt: optax.OptState
    value_opt: optax.OptState


class Hyper(NamedTuple):
    """Numeric hyperparameters that do not change shapes, as float32 arrays (vmappable)."""

    expectile: jax.Array
    beta: jax.Array
    discount: jax.Array
    tau: jax.Array


class Batch(NamedTuple):
    observations: jax.Array
    actions: jax.Array
    rewards: jax.Array
    next_observations: jax.Array
    masks: jax.Array  # 1 - terminal: truncation still bootstraps


# --- Losses and the update --------------------------------------------------------------------
def expectile_loss(diff: jax.Array, expectile: jax.Array) -> jax.Array:
    """|tau - 1(diff < 0)| * diff^2, elementwise; diff = Q(s, a) - V(s)."""
    weight = jnp.where(diff > 0, expectile, 1.0 - expectile)
    return weight * diff**2


def awr_weights(adv: jax.Array, beta: jax.Array) -> jax.Array:
    """exp(beta * advantage), clipped at 100 as in the official code."""
    return jnp.minimum(jnp.exp(beta * adv), 100.0)


def gaussian_log_prob(mean, log_std, action):
    return (-0.5 * ((action - mean) / jnp.exp(log_std)) ** 2 - log_std - 0.5 * jnp.log(2 * jnp.pi)).sum(-1)


def schedule_change(run_config: dict, args: Args, step: int) -> str | None:
    """What a resumed run's larger budget does to the actor's learning rate, when it changes the
    schedule the run followed so far: an offline-only run decays it by cosine over its --total-steps,
    a run with an online phase keeps it constant (see make_agent). None when nothing changes."""
    total, online = run_config.get("total_steps", args.total_steps), run_config.get("online_steps", 0)
    if online > 0 or (args.online_steps == 0 and args.total_steps == total):
        return None
    was = optax.cosine_decay_schedule(args.actor_lr, total)(step)
    if args.online_steps > 0:
        return (
            f"--online-steps {args.online_steps} on a run started offline-only: its {step} updates so far "
            f"decayed the actor's learning rate by cosine over {total} (now {was:.3g}); from here it is "
            f"constant at {args.actor_lr:g}, as in a run given an online phase from its start. "
            "No uninterrupted run has this schedule"
        )
    now = optax.cosine_decay_schedule(args.actor_lr, args.total_steps)(step)
    return (
        f"--total-steps {args.total_steps} on a run started with {total}: the actor's cosine schedule "
        f"now spans {args.total_steps} updates, so its learning rate at update {step} goes from {was:.3g} "
        f"to {now:.3g}. No uninterrupted run has this schedule"
    )


def make_agent(args: Args, obs_dim: int, action_dim: int):
    """init, update and act for one seed, closed over the (static) architecture and optimizers."""
    actor = Actor(args.hidden_dims, action_dim, args.dropout)
    critic, value = Critic(args.hidden_dims), ValueNet(args.hidden_dims)

    def twin_q(params, obs, action):
        """Both critics in one call: their parameters are stacked on a leading axis of 2."""
        return jax.vmap(critic.apply, in_axes=(0, None, None))(params, obs, action)  # (2, batch)

    # Always a schedule (constant when an online phase follows), so the optimizer state has one
    # structure whatever the budget: a resumed run may extend --online-steps.
    actor_lr = (
        optax.cosine_decay_schedule(args.actor_lr, args.total_steps)
        if args.online_steps == 0
        else optax.constant_schedule(args.actor_lr)
    )
    actor_tx, critic_tx, value_tx = optax.adam(actor_lr), optax.adam(args.critic_lr), optax.adam(args.value_lr)

    def init(key) -> TrainState:
        k_actor, k_q1, k_q2, k_value = jax.random.split(key, 4)
        obs, act = jnp.zeros((1, obs_dim)), jnp.zeros((1, action_dim))
        actor_params = actor.init(k_actor, obs)
        # Two inits, then stacked: an init vmapped over the critics would batch the orthogonal
        # initializer's QR, which can deadlock jaxlib's LAPACK on CPU (see train()).
        critic_params = jax.tree_util.tree_map(
            lambda a, b: jnp.stack([a, b]), critic.init(k_q1, obs, act), critic.init(k_q2, obs, act)
        )
        value_params = value.init(k_value, obs)
        return TrainState(
            actor_params,
            critic_params,
            jax.tree_util.tree_map(jnp.copy, critic_params),  # own buffers: the state is donated
            value_params,
            actor_tx.init(actor_params),
            critic_tx.init(critic_params),
            value_tx.init(value_params),
        )

    def update(s: TrainState, batch: Batch, key, hp: Hyper):
        # 1. V by expectile regression on the target critic's Q of dataset actions.
        q1_t, q2_t = twin_q(s.target_critic, batch.observations, batch.actions)
        q_t = jnp.minimum(q1_t, q2_t)

        def value_loss(p):
            v = value.apply(p, batch.observations)
            return expectile_loss(q_t - v, hp.expectile).mean(), v.mean()

        (v_loss, v_mean), grads = jax.value_and_grad(value_loss, has_aux=True)(s.value)
        upd, value_opt = value_tx.update(grads, s.value_opt)
        value_params = optax.apply_updates(s.value, upd)

        # 2. Actor by advantage-weighted regression, with the new V.
        adv = q_t - value.apply(value_params, batch.observations)
        weights = awr_weights(adv, hp.beta)

        def actor_loss(p):
            mean, log_std = actor.apply(p, batch.observations, training=True, rngs={"dropout": key})
            return -(weights * gaussian_log_prob(mean, log_std, batch.actions)).mean()

        a_loss, grads = jax.value_and_grad(actor_loss)(s.actor)
        upd, actor_opt = actor_tx.update(grads, s.actor_opt)
        actor_params = optax.apply_updates(s.actor, upd)

        # 3. Q bootstraps from the new V(s') (no target V, no min in the target).
        target = batch.rewards + hp.discount * batch.masks * value.apply(value_params, batch.next_observations)

        def critic_loss(p):
            q1, q2 = twin_q(p, batch.observations, batch.actions)
            return ((q1 - target) ** 2 + (q2 - target) ** 2).mean(), q1.mean()

        (c_loss, q_mean), grads = jax.value_and_grad(critic_loss, has_aux=True)(s.critic)
        upd, critic_opt = critic_tx.update(grads, s.critic_opt)
        critic_params = optax.apply_updates(s.critic, upd)

        # 4. Polyak averaging of the target critic.
        target_params = optax.incremental_update(critic_params, s.target_critic, hp.tau)
        state = TrainState(actor_params, critic_params, target_params, value_params, actor_opt, critic_opt, value_opt)
        metrics = {
            "value_loss": v_loss,
            "actor_loss": a_loss,
            "critic_loss": c_loss,
            "v_mean": v_mean,
            "q_mean": q_mean,
            "adv_mean": adv.mean(),
            "weight_mean": weights.mean(),
        }
        return state, metrics

    def act(actor_params, obs, key, deterministic: bool, temperature=1.0):
        mean, log_std = actor.apply(actor_params, obs)
        if deterministic:
            return jnp.clip(mean, -1.0, 1.0)
        noise = jax.random.normal(key, mean.shape) * jnp.exp(log_std) * temperature
        return jnp.clip(mean + noise, -1.0, 1.0)

    return init, update, act


def process_rewards(rewards: np.ndarray, meta) -> tuple[np.ndarray, float, float]:
    """(processed rewards, scale, shift): r * scale + shift, as the official code per domain."""
    if meta.domain == "locomotion":
        span = float(meta.episode_returns.max() - meta.episode_returns.min())
        scale = 1000.0 / max(span, 1e-6)
        return rewards * scale, scale, 0.0
    if meta.domain in ("antmaze", "pointmaze"):
        return rewards - 1.0, 1.0, -1.0
    return rewards, 1.0, 0.0


def sample_batch(data: Batch, key, batch_size: int) -> Batch:
    idx = jax.random.randint(key, (batch_size,), 0, data.rewards.shape[0])
    return jax.tree_util.tree_map(lambda x: x[idx], data)


def make_train_chunk(update, batch_size: int, num_updates: int):
    """A jitted scan of `num_updates` updates, vmapped over seeds; batches drawn inside the scan."""

    def one_seed(state, key, data, hp):
        def body(carry, _):
            state, key = carry
            key, k_batch, k_update = jax.random.split(key, 3)
            state, metrics = update(state, sample_batch(data, k_batch, batch_size), k_update, hp)
            return (state, key), metrics

        (state, key), metrics = jax.lax.scan(body, (state, key), None, length=num_updates)
        return state, key, metrics  # metrics: (num_updates,) each

    vmapped = vmap_members(one_seed, in_axes=(0, 0, None, 0))  # hp per member: the sweep's values are traced
    return jax.jit(vmapped, donate_argnums=(0,))


# --- Online fine-tuning -----------------------------------------------------------------------
def make_online_step(update, act, batch_size: int, temperature: float):
    """One jitted call per environment step: store each seed's transition, update on a batch drawn
    uniformly from offline + online data (the official buffer is seeded with the dataset), act."""

    def one_seed(state, key, buf, n, transition, next_obs, offline, hp):
        buf = jax.tree_util.tree_map(lambda b, x: b.at[n].set(x), buf, transition)
        key, k_idx, k_up, k_act = jax.random.split(key, 4)
        n_off = offline.rewards.shape[0]
        idx = jax.random.randint(k_idx, (batch_size,), 0, n_off + n + 1)
        from_online = idx >= n_off
        batch = jax.tree_util.tree_map(
            lambda off, on: jnp.where(
                from_online.reshape(-1, *([1] * (off.ndim - 1))),
                on[jnp.clip(idx - n_off, 0, on.shape[0] - 1)],
                off[jnp.minimum(idx, n_off - 1)],
            ),
            offline,
            buf,
        )
        state, metrics = update(state, batch, k_up, hp)
        action = act(state.actor, next_obs, k_act, False, temperature)
        return state, key, buf, action, metrics

    vmapped = vmap_members(one_seed, in_axes=(0, 0, 0, None, 0, 0, None, 0))
    return jax.jit(vmapped, donate_argnums=(0, 2))


def online_phase(args, meta, states, keys, offline: Batch, update, act, hp, logger, policy, reward_fn, seeds, ck=None):
    """Fine-tune online from `states` (or continue from the checkpoint `ck` of an online phase);
    `seeds` names the members (seeds, times the sweep's points), one environment each."""
    num_seeds = len(seeds)
    envs = OnlineEnvs(meta, [args.seed + 1000 + i % args.num_seeds for i in range(num_seeds)])
    obs_dim, action_dim = meta.obs_dim, meta.action_dim
    shapes = [(obs_dim,), (action_dim,), (), (obs_dim,), ()]
    # Per-member online transitions (members, online_steps, ...); the offline data is shared.
    buf = shard(Batch(*(jnp.zeros((num_seeds, args.online_steps) + shape) for shape in shapes)))
    step_fn = make_online_step(update, act, args.batch_size, args.exploration_temperature)
    if ck is None:
        t = 0
        obs = envs.reset()
        act_jit = jax.jit(jax.vmap(lambda p, o, k: act(p, o, k, False, args.exploration_temperature)))
        keys, k_act = jax.vmap(lambda k: tuple(jax.random.split(k)))(keys)
        actions = np.asarray(act_jit(states.actor, obs, k_act))
    else:  # the buffer's first t rows, the environments replayed to step t, the pending actions
        t = ck.step
        buf = shard(Batch(*(b.at[:, :t].set(ck.online[name]) for name, b in zip(Batch._fields, buf))))
        obs = envs.restore(ck.host)
        actions = ck.host["next_actions"]
    logger.progress(args.online_steps, initial=t, desc="online")
    while t < args.online_steps:
        next_obs, reward, term, trunc, true_next = envs.step(actions)
        transition = Batch(
            jnp.asarray(obs), jnp.asarray(actions), jnp.asarray(reward_fn(reward), jnp.float32),
            jnp.asarray(true_next), jnp.asarray(1.0 - term, jnp.float32),
        )  # fmt: skip
        next_flat = jnp.asarray(next_obs)
        states, keys, buf, actions, metrics = step_fn(states, keys, buf, t, transition, next_flat, offline, hp)
        actions, obs, t = np.asarray(actions), next_obs, t + 1
        logger.advance(1)
        if t % args.eval_every == 0 or t == args.online_steps:
            metrics = {k: np.asarray(v)[:, None] for k, v in jax.device_get(metrics).items()}
            bad = first_nonfinite(metrics, t - 1, seeds)
            if bad:
                logger.stop_nonfinite(bad, " in online training")
            logger.metrics(args.total_steps + t, metrics)
            result = evaluate(meta, policy, states.actor, num_episodes=args.eval_episodes, seed=args.seed,
                              video=logger.video(t, "online"))  # fmt: skip
            logger.evaluation(t, result, phase="online")
            online = Batch(*(b[:, :t] for b in buf))
            host = {**envs.state(), "next_actions": actions}
            logger.save_checkpoint(states, t, keys, "online", online=online, host=host)
    envs.close()
    return states


# --- Training ---------------------------------------------------------------------------------
def train(args: Args) -> dict:
    data, meta = load_dataset(args.dataset)
    args = resolve(args, meta)
    rewards, scale, shift = process_rewards(np.asarray(data.rewards), meta)
    offline = Batch(
        data.observations,
        jnp.clip(data.actions, -1 + ACTION_EPS, 1 - ACTION_EPS),
        jnp.asarray(rewards, jnp.float32),
        data.next_observations,
        1.0 - data.terminals.astype(jnp.float32),
    )
    offline = replicate(offline)
    init, update, act = make_agent(args, meta.obs_dim, meta.action_dim)
    # Members: every seed of every --sweep point (one point without --sweep), sharded over devices.
    points = sweep_points(args.sweep, args, SWEEPABLE)
    hp = shard(member_hyper(Hyper, args, points, args.num_seeds))
    seeds = list(range(args.seed, args.seed + args.num_seeds))
    members = member_labels(points, seeds)
    keys = jnp.stack([jax.random.key(s) for s in seeds])
    init_keys, keys = jax.vmap(lambda k: tuple(jax.random.split(k)))(keys)
    # One jitted init per seed, stacked: seed i starts exactly as a single-seed run would, and no
    # vmapped (batched) QR of the orthogonal init reaches jaxlib's LAPACK, which waits on XLA's CPU
    # thread pool from inside it and can deadlock on 2 cores.
    init_one = jax.jit(init)
    states = jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *[init_one(k) for k in init_keys])
    states, keys = shard(tile(states, len(points))), shard(tile(keys, len(points)))

    logger = RunLogger("iql", args, meta, seeds=seeds, paper_steps=PAPER_STEPS, points=points)
    print(f"IQL on {args.dataset} ({meta.domain}, {meta.size} transitions): expectile {args.expectile}, "
          f"beta {args.beta}, dropout {args.dropout}, {args.eval_episodes} eval episodes"
          + (f"; sweep of {len(points)} points x {len(seeds)} seeds: {' '.join(args.sweep)}" if args.sweep else "")
          + (f"; members sharded over {jax.device_count()} devices" if jax.device_count() > 1 else ""),
          flush=True)  # fmt: skip
    step, phase, ck = 0, "offline", None
    if logger.resumed:
        ck = logger.load_checkpoint(states, keys)
        states, step, keys, phase = ck.state, ck.step, ck.rng, ck.phase
        print(f"resumed from {phase} step {step}", flush=True)
        change = schedule_change(logger.checkpoint_config, args, step)
        if change:
            logger.note(change)

    @jax.jit
    def policy(actor_params, carry, obs, prev_reward, rng):  # obs: (num_seeds, episodes, obs_dim)
        return jax.vmap(lambda p, o: act(p, o, rng, True))(actor_params, obs), carry

    if args.eval_only:
        return logger.loaded(policy, states.actor)
    t0 = time.time()
    if phase == "offline" and step < args.total_steps:
        logger.progress(args.total_steps, initial=step, desc="offline")
        chunks: dict[int, object] = {}
        while step < args.total_steps:
            n = min(args.eval_every, args.total_steps - step)
            if n not in chunks:
                chunks[n] = make_train_chunk(update, args.batch_size, n)
            states, keys, metrics = chunks[n](states, keys, offline, hp)
            metrics = jax.device_get(metrics)
            bad = first_nonfinite(metrics, step, members)
            if bad:
                logger.stop_nonfinite(bad)
            step += n
            logger.advance(n)
            logger.metrics(step, metrics)
            result = evaluate(meta, policy, states.actor, num_episodes=args.eval_episodes, seed=args.seed,
                              video=logger.video(step))  # fmt: skip
            logger.evaluation(step, result, phase="offline")
            logger.save_checkpoint(states, step, keys, "offline")
        print(f"offline: {args.total_steps} updates in {time.time() - t0:.0f} s, "
              f"normalized {logger.record['final']['normalized_mean']:.1f}", flush=True)  # fmt: skip
    if args.online_steps > 0 and not (phase == "online" and step >= args.online_steps):
        states = online_phase(
            args, meta, states, keys, offline, update, act, hp, logger, policy,
            lambda r: np.asarray(r, np.float32) * scale + shift, members, ck if phase == "online" else None,
        )  # fmt: skip
    record = logger.close()
    final = record["final"]
    print(f"final normalized score {final['normalized_mean']:.1f} ± {final['normalized_std']:.1f} "
          f"(seeds {seeds}); record: {logger.run_dir / 'record.json'}", flush=True)  # fmt: skip
    return record


if __name__ == "__main__":
    cli(Args, train, validate=validate)
