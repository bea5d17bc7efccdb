"""Conservative Q-Learning (CQL): Kumar, Zhou, Tucker and Levine, "Conservative Q-Learning for Offline
Reinforcement Learning", NeurIPS 2020. https://arxiv.org/abs/2006.04779

CQL is SAC plus a regularizer that pushes Q down on actions the current policy (and a uniform
proposal) would pick and up on the dataset's actions: for every critic it adds
alpha_cql * E_s[logsumexp_a Q(s, a) - Q(s, a_data)], the logsumexp estimated by importance
sampling from 10 uniform actions, 10 actions of pi(.|s) and 10 of pi(.|s') (all evaluated at s).
The learnt Q is then a lower bound of the policy's value on out-of-distribution actions, so the
policy cannot exploit critic errors there. The Lagrange form tunes the weight so that the gap
matches `target_action_gap`.

Follows the importance-sampled CQL(H) of the official code (aviralkumar2907/CQL) as ported to JAX
by young-geng/JaxCQL: tanh-Gaussian actor with a learnt log-std multiplier and offset, twin critics
and Polyak targets, automatic entropy tuning, deterministic backup (no entropy term), every
parameter group updated from one forward pass. Locomotion defaults are CORL's tuned values
(alpha_cql 10, policy lr 3e-5, 3x256 networks, state normalization, rewards scaled by
1000 / (max - min episode return)); the AntMaze preset is CORL's (Lagrange with gap 0.8, max-target
backup, clipped gap at -200, r -> 10 r - 5, 5x256 critics). PointMaze uses the AntMaze preset (a
sparse goal-reaching task, this repo's choice); other domains the locomotion one.

    python algorithms/cql.py                                   # local/hopper/medium-v0, 1M updates
    python algorithms/cql.py --dataset local/hopper/medium-v0 --num-seeds 2 --total-steps 10000
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
import tyro

from common.data import load_dataset
from common.evaluation import evaluate
from common.logging import RunLogger, first_nonfinite


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
    """a run directory to continue from its checkpoint"""
    # --- Training ---
    total_steps: int = 1_000_000
    """offline gradient updates (the paper's 1M)"""
    eval_every: int = 5_000
    """updates between evaluations"""
    eval_episodes: int = 10
    """evaluation episodes per seed"""
    batch_size: int = 256
    """transitions per update per seed"""
    hidden_dims: tuple[int, ...] | None = None
    """hidden sizes of the actor and the critics (None: preset, 256 256 256)"""
    critic_hidden_dims: tuple[int, ...] | None = None
    """hidden sizes of the critics only (None: --hidden-dims if given, else preset: 3x256, AntMaze 5x256)"""
    # --- SAC ---
    policy_lr: float | None = None
    """actor and entropy-temperature learning rate (None: preset 3e-5 locomotion, 1e-4 mazes)"""
    qf_lr: float = 3e-4
    """critic (and Lagrange multiplier) learning rate"""
    discount: float = 0.99
    """discount gamma"""
    tau: float = 0.005
    """Polyak rate of the target critics"""
    alpha_multiplier: float = 1.0
    """multiplier of the learnt entropy temperature"""
    target_entropy: float | None = None
    """entropy target of the temperature (None: -action_dim)"""
    backup_entropy: bool = False
    """subtract alpha * log pi(a'|s') in the Bellman target (off: the official deterministic backup)"""
    bc_steps: int = 0
    """first updates where the actor does behaviour cloning instead of maximizing Q"""
    # --- CQL ---
    cql_alpha: float | None = None
    """weight of the CQL gap (None: preset 10 locomotion, 5 mazes)"""
    cql_n_actions: int = 10
    """actions sampled per state from each of uniform, pi(.|s) and pi(.|s')"""
    cql_importance_sample: bool = True
    """importance-sampled CQL(H) (else the logsumexp also holds Q(s, a_data), unweighted)"""
    cql_temp: float = 1.0
    """temperature of the logsumexp"""
    cql_lagrange: bool | None = None
    """tune the CQL weight by dual gradient descent (None: preset, on for mazes)"""
    target_action_gap: float | None = None
    """gap the Lagrange form aims at (None: preset 0.8 mazes; unused without Lagrange)"""
    max_target_backup: bool | None = None
    """Bellman target = max over cql_n_actions sampled a' of min Qbar (None: preset, on for mazes)"""
    cql_clip_diff_min: float | None = None
    """lower clip of the per-state gap (None: preset -inf locomotion, -200 mazes)"""
    cql_clip_diff_max: float = float("inf")
    """upper clip of the per-state gap"""
    # --- Data ---
    normalize_states: bool | None = None
    """standardize observations with the dataset's mean and std (None: preset, locomotion only)"""
    normalize_rewards: bool | None = None
    """scale rewards by 1000 / (max - min episode return) (None: preset, locomotion only)"""
    reward_scale: float | None = None
    """r -> r * scale + bias after normalization (None: preset 1 locomotion, 10 mazes)"""
    reward_bias: float | None = None
    """(None: preset 0 locomotion, -5 mazes)"""


# Presets per domain, from CORL's tuned configs (configs/offline/cql/*).
_DENSE = dict(
    policy_lr=3e-5, hidden_dims=(256, 256, 256), critic_hidden_dims=(256, 256, 256), cql_alpha=10.0,
    cql_lagrange=False, target_action_gap=-1.0, max_target_backup=False, cql_clip_diff_min=-float("inf"),
    normalize_states=True, normalize_rewards=True, reward_scale=1.0, reward_bias=0.0,
)  # fmt: skip
_MAZE = dict(
    policy_lr=1e-4, hidden_dims=(256, 256, 256), critic_hidden_dims=(256,) * 5, cql_alpha=5.0,
    cql_lagrange=True, target_action_gap=0.8, max_target_backup=True, cql_clip_diff_min=-200.0,
    normalize_states=False, normalize_rewards=False, reward_scale=10.0, reward_bias=-5.0,
)  # fmt: skip
PRESETS = {"locomotion": _DENSE, "antmaze": _MAZE, "pointmaze": _MAZE, "adroit": _DENSE, "kitchen": _DENSE}
LOG_STD_MIN, LOG_STD_MAX = -20.0, 2.0
ACTION_CLIP = 0.999  # JaxCQL clips dataset actions so that log pi(a_data|s) stays finite
PAPER_STEPS = (1_000_000, 0)


def resolve(args: Args, domain: str) -> Args:
    """Fill the None fields from the domain's preset; an explicit flag always wins."""
    preset = dict(PRESETS[domain])
    if args.hidden_dims is not None:  # --hidden-dims sizes every MLP unless the critics have their own
        preset["critic_hidden_dims"] = args.hidden_dims
    return dataclasses.replace(args, **{k: v for k, v in preset.items() if getattr(args, k) is None})


# --- Networks ---------------------------------------------------------------------------------
class MLP(nn.Module):
    """ReLU MLP, orthogonal init (scale sqrt 2), last layer orthogonal with scale 1e-2 (JaxCQL)."""

    hidden_dims: tuple[int, ...]
    out_dim: int

    @nn.compact
    def __call__(self, x):
        for d in self.hidden_dims:
            x = nn.relu(nn.Dense(d, kernel_init=nn.initializers.orthogonal(np.sqrt(2)))(x))
        return nn.Dense(self.out_dim, kernel_init=nn.initializers.orthogonal(1e-2))(x)


class Critics(nn.Module):
    """Twin Q networks: Q(s, a) has a leading axis of 2. Two separate MLPs rather than one nn.vmap'd
    MLP: a vmapped orthogonal init is a batched QR, which jaxlib splits over XLA's CPU thread pool
    and waits on from inside that pool; two at once on a 2-core machine deadlock (seen with gdb)."""

    hidden_dims: tuple[int, ...]

    @nn.compact
    def __call__(self, obs, action):
        x = jnp.concatenate([obs, action], -1)
        return jnp.stack([MLP(self.hidden_dims, 1)(x)[..., 0], MLP(self.hidden_dims, 1)(x)[..., 0]])


class Actor(nn.Module):
    """Tanh-Gaussian policy; log_std = multiplier * raw + offset with both scalars learnt (JaxCQL)."""

    hidden_dims: tuple[int, ...]
    action_dim: int

    @nn.compact
    def __call__(self, obs):
        mean, raw_log_std = jnp.split(MLP(self.hidden_dims, 2 * self.action_dim)(obs), 2, axis=-1)
        multiplier = self.param("log_std_multiplier", nn.initializers.constant(1.0), ())
        offset = self.param("log_std_offset", nn.initializers.constant(-1.0), ())
        return mean, jnp.clip(multiplier * raw_log_std + offset, LOG_STD_MIN, LOG_STD_MAX)


def tanh_gaussian_log_prob(mean, log_std, pre_tanh):
    """log density of a = tanh(u), u ~ N(mean, std^2), summed over the action axis."""
    gauss = -0.5 * ((pre_tanh - mean) / jnp.exp(log_std)) ** 2 - log_std - 0.5 * jnp.log(2 * jnp.pi)
    log_det = 2.0 * (jnp.log(2.0) - pre_tanh - jax.nn.softplus(-2.0 * pre_tanh))  # log(1 - tanh(u)^2)
    return (gauss - log_det).sum(-1)


def sample_actions(mean, log_std, key, n: int):
    """n reparameterized samples per state: actions (..., n, A) and log-probs (..., n)."""
    mean, log_std = mean[..., None, :], log_std[..., None, :]
    noise = jax.random.normal(key, mean.shape[:-2] + (n, mean.shape[-1]))
    pre_tanh = mean + jnp.exp(log_std) * noise
    return jnp.tanh(pre_tanh), tanh_gaussian_log_prob(mean, log_std, pre_tanh)


def q_multi(critic: Critics, params, obs, actions):
    """Q of M actions per state in one forward pass: obs (B, d), actions (B, M, A) -> (2, B, M)."""
    obs = jnp.broadcast_to(obs[:, None, :], actions.shape[:2] + obs.shape[-1:])
    return critic.apply(params, obs, actions)


class TrainState(NamedTuple):
    """Everything one seed trains. `params` holds the groups actor, critic, log_alpha, log_alpha_prime."""

    params: dict
    target_critic: dict
    opt: optax.OptState  # one Adam over all groups: Adam is elementwise, so this equals one per group
    obs_mean: jax.Array  # observation statistics of the dataset, used by the policy at evaluation
    obs_std: jax.Array
    step: jax.Array


class Hyper(NamedTuple):
    """Numeric hyperparameters that do not change shapes, as float32 arrays (vmappable)."""

    cql_alpha: jax.Array
    cql_lagrange: jax.Array  # 0 or 1
    cql_temp: jax.Array
    target_action_gap: jax.Array
    clip_diff_min: jax.Array
    clip_diff_max: jax.Array
    policy_lr: jax.Array
    qf_lr: jax.Array
    discount: jax.Array
    tau: jax.Array
    alpha_multiplier: jax.Array
    target_entropy: jax.Array
    backup_entropy: jax.Array  # 0 or 1
    bc_steps: jax.Array


class Batch(NamedTuple):
    observations: jax.Array
    actions: jax.Array
    rewards: jax.Array
    next_observations: jax.Array
    masks: jax.Array  # 1 - terminal: truncation still bootstraps


# --- The CQL terms and the update -------------------------------------------------------------
def cql_penalty(q_data, q_rand, q_next, q_cur, logp_next, logp_cur, action_dim: int, temp, clip_min, clip_max,
                importance_sample: bool = True):  # fmt: skip
    """The CQL(H) gap of each critic: mean over states of clip(temp * logsumexp(X / temp) - Q(s, a_data)).

    q_data (2, B); q_rand, q_next, q_cur (2, B, N), all at the data state s (a_next ~ pi(.|s') too);
    logp_next, logp_cur (B, N). With importance sampling each sample is divided by its proposal
    density: X = [Q(s, a_rand) - log 0.5^|A|, Q(s, a_next) - log pi(a_next|s'), Q(s, a_cur) -
    log pi(a_cur|s)]; without, X = [Q(s, a_rand), Q(s, a_data), Q(s, a_next), Q(s, a_cur)].
    Returns (gap (2,), logsumexp term (2, B)).
    """
    if importance_sample:
        log_uniform = action_dim * jnp.log(0.5)
        x = jnp.concatenate([q_rand - log_uniform, q_next - logp_next, q_cur - logp_cur], -1)
    else:
        x = jnp.concatenate([q_rand, q_data[..., None], q_next, q_cur], -1)
    ood = temp * jax.nn.logsumexp(x / temp, axis=-1)
    return jnp.clip(ood - q_data, clip_min, clip_max).mean(-1), ood


def alpha_prime_of(log_alpha_prime):
    return jnp.clip(jnp.exp(log_alpha_prime), 0.0, 1e6)


def lagrange_loss(log_alpha_prime, gap, cql_alpha, target_action_gap):
    """Dual loss of the CQL weight: minimizing it raises alpha' while the gap exceeds the target."""
    gap = jax.lax.stop_gradient(gap)
    return -(alpha_prime_of(log_alpha_prime) * cql_alpha * (gap - target_action_gap)).mean()


def make_agent(args: Args, obs_dim: int, action_dim: int):
    """init, update and act for one seed, closed over the (static) architecture and switches."""
    actor, critic = Actor(args.hidden_dims, action_dim), Critics(args.critic_hidden_dims)
    n = args.cql_n_actions
    adam = optax.scale_by_adam()  # learning rates come from Hyper, per group

    def init(key, obs_mean, obs_std) -> TrainState:
        k_actor, k_critic = jax.random.split(key)
        obs, act = jnp.zeros((1, obs_dim)), jnp.zeros((1, action_dim))
        params = {
            "actor": actor.init(k_actor, obs),
            "critic": critic.init(k_critic, obs, act),
            "log_alpha": jnp.zeros(()),
            "log_alpha_prime": jnp.ones(()),  # JaxCQL's initial value
        }
        target = jax.tree_util.tree_map(jnp.copy, params["critic"])  # own buffers: the state is donated
        return TrainState(params, target, adam.init(params), obs_mean, obs_std, jnp.zeros((), jnp.int32))

    def update(s: TrainState, batch: Batch, key, hp: Hyper):
        k_rand, k_cur, k_next = jax.random.split(key, 3)
        B = batch.rewards.shape[0]
        alpha = jnp.exp(s.params["log_alpha"]) * hp.alpha_multiplier

        # pi(.|s') serves the Bellman target (one sample, or all n for the max backup) and the CQL term.
        mean_n, log_std_n = actor.apply(s.params["actor"], batch.next_observations)
        a_next, logp_next = sample_actions(mean_n, log_std_n, k_next, n)  # (B, n, A), (B, n)
        k_t = n if args.max_target_backup else 1
        q_next_t = q_multi(critic, s.target_critic, batch.next_observations, a_next[:, :k_t]).min(0)  # (B, k_t)
        best = jnp.argmax(q_next_t, -1)  # k_t = 1: the single sample
        target_q = jnp.take_along_axis(q_next_t, best[:, None], -1)[:, 0]
        target_q = target_q - hp.backup_entropy * alpha * jnp.take_along_axis(logp_next, best[:, None], -1)[:, 0]
        y = batch.rewards + hp.discount * batch.masks * target_q
        a_rand = jax.random.uniform(k_rand, (B, n, action_dim), minval=-1.0, maxval=1.0)

        def loss_fn(params):
            # Actor and temperature: SAC's losses on pi(.|s); its first sample is a~ of the actor loss.
            mean, log_std = actor.apply(params["actor"], batch.observations)
            a_cur, logp_cur = sample_actions(mean, log_std, k_cur, n)
            q_pi = critic.apply(jax.lax.stop_gradient(params["critic"]), batch.observations, a_cur[:, 0]).min(0)
            bc = tanh_gaussian_log_prob(mean, log_std, jnp.arctanh(batch.actions))
            objective = jnp.where(s.step < hp.bc_steps, bc, q_pi)
            actor_loss = (jax.lax.stop_gradient(alpha) * logp_cur[:, 0] - objective).mean()
            alpha_loss = -(params["log_alpha"] * jax.lax.stop_gradient(logp_cur[:, 0] + hp.target_entropy)).mean()

            # Critics: TD error plus the CQL gap; all 1 + 3n actions per state in one forward pass.
            a_cur, logp_cur = jax.lax.stop_gradient((a_cur, logp_cur))
            actions = jnp.concatenate([batch.actions[:, None], a_rand, a_next, a_cur], 1)
            q = q_multi(critic, params["critic"], batch.observations, actions)  # (2, B, 1 + 3n)
            q_data, q_rand, q_next, q_cur = (
                q[..., 0],
                q[..., 1 : 1 + n],
                q[..., 1 + n : 1 + 2 * n],
                q[..., 1 + 2 * n :],
            )
            gap, ood = cql_penalty(
                q_data, q_rand, q_next, q_cur, logp_next, logp_cur, action_dim, hp.cql_temp, hp.clip_diff_min,
                hp.clip_diff_max, args.cql_importance_sample,
            )  # fmt: skip
            bellman = ((q_data - y) ** 2).mean(-1).sum()
            # Lagrange (a 0/1 array, so one compiled update serves both forms): weight alpha' * alpha_cql
            # on gap - target_action_gap; else alpha_cql on the gap itself.
            alpha_prime = hp.cql_lagrange * jax.lax.stop_gradient(alpha_prime_of(params["log_alpha_prime"]))
            weight = jnp.where(hp.cql_lagrange > 0, alpha_prime, 1.0) * hp.cql_alpha
            penalty = (weight * (gap - hp.cql_lagrange * hp.target_action_gap)).sum()
            dual_loss = hp.cql_lagrange * lagrange_loss(
                params["log_alpha_prime"], gap, hp.cql_alpha, hp.target_action_gap
            )
            critic_loss = bellman + penalty
            metrics = {
                "actor_loss": actor_loss,
                "critic_loss": critic_loss,
                "bellman_loss": bellman,
                "cql_gap": gap.mean(),
                "alpha": alpha,
                "alpha_prime": alpha_prime,
                "entropy": -logp_cur[:, 0].mean(),
                "q_data": q_data.mean(),
                "q_ood_logsumexp": ood.mean(),
                "target_q": y.mean(),
            }
            # Each term reaches only its own parameter group (the others are under stop_gradient),
            # so one gradient of the sum is the per-group gradients of JaxCQL's simultaneous update.
            return actor_loss + alpha_loss + critic_loss + dual_loss, metrics

        grads, metrics = jax.grad(loss_fn, has_aux=True)(s.params)
        updates, opt = adam.update(grads, s.opt)
        lrs = {
            "actor": jax.tree_util.tree_map(lambda _: hp.policy_lr, s.params["actor"]),
            "critic": jax.tree_util.tree_map(lambda _: hp.qf_lr, s.params["critic"]),
            "log_alpha": hp.policy_lr,
            "log_alpha_prime": hp.qf_lr,
        }
        params = jax.tree_util.tree_map(lambda p, u, lr: p - lr * u, s.params, updates, lrs)
        target = optax.incremental_update(params["critic"], s.target_critic, hp.tau)
        return TrainState(params, target, opt, s.obs_mean, s.obs_std, s.step + 1), metrics

    def act(actor_params, obs_mean, obs_std, obs, key, deterministic: bool):
        mean, log_std = actor.apply(actor_params, (obs - obs_mean) / obs_std)
        if deterministic:
            return jnp.tanh(mean)
        return jnp.tanh(mean + jnp.exp(log_std) * jax.random.normal(key, mean.shape))

    return init, update, act


def process_rewards(rewards: np.ndarray, meta, args: Args) -> np.ndarray:
    """CORL's reward handling: 1000 / (max - min episode return) on locomotion, then scale and bias."""
    if args.normalize_rewards:
        span = float(meta.episode_returns.max() - meta.episode_returns.min())
        rewards = rewards * (1000.0 / max(span, 1e-6))
    return rewards * args.reward_scale + args.reward_bias


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

    return jax.jit(jax.vmap(one_seed, in_axes=(0, 0, None, None)), donate_argnums=(0,))


def make_hyper(args: Args, action_dim: int) -> Hyper:
    values = dict(
        cql_alpha=args.cql_alpha, cql_lagrange=float(args.cql_lagrange), cql_temp=args.cql_temp,
        target_action_gap=args.target_action_gap, clip_diff_min=args.cql_clip_diff_min,
        clip_diff_max=args.cql_clip_diff_max, policy_lr=args.policy_lr, qf_lr=args.qf_lr,
        discount=args.discount, tau=args.tau, alpha_multiplier=args.alpha_multiplier,
        backup_entropy=float(args.backup_entropy),
        target_entropy=-float(action_dim) if args.target_entropy is None else args.target_entropy,
        bc_steps=args.bc_steps,
    )  # fmt: skip
    return Hyper(**{k: jnp.float32(v) for k, v in values.items()})


# --- Training ---------------------------------------------------------------------------------
def train(args: Args) -> dict:
    data, meta = load_dataset(args.dataset)
    args = resolve(args, meta.domain)
    observations, next_observations = np.asarray(data.observations), np.asarray(data.next_observations)
    if args.normalize_states:  # CORL: statistics of the dataset's states, eps 1e-3
        obs_mean, obs_std = observations.mean(0), observations.std(0) + 1e-3
    else:
        obs_mean, obs_std = np.zeros(meta.obs_dim, np.float32), np.ones(meta.obs_dim, np.float32)
    offline = Batch(
        jnp.asarray((observations - obs_mean) / obs_std, jnp.float32),
        jnp.clip(data.actions, -ACTION_CLIP, ACTION_CLIP),
        jnp.asarray(process_rewards(np.asarray(data.rewards), meta, args), jnp.float32),
        jnp.asarray((next_observations - obs_mean) / obs_std, jnp.float32),
        1.0 - data.terminals.astype(jnp.float32),
    )
    init, update, act = make_agent(args, meta.obs_dim, meta.action_dim)
    hp = make_hyper(args, meta.action_dim)
    seeds = list(range(args.seed, args.seed + args.num_seeds))
    keys = jnp.stack([jax.random.key(s) for s in seeds])
    init_keys, keys = jax.vmap(lambda k: tuple(jax.random.split(k)))(keys)
    # One jitted init per seed, stacked: seed i starts exactly as a single-seed run would, and no
    # vmapped (batched) QR reaches jaxlib's thread-pool LAPACK (see Critics).
    init_one = jax.jit(init)
    mean_std = (jnp.float32(obs_mean), jnp.float32(obs_std))
    states = jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *[init_one(k, *mean_std) for k in init_keys])

    logger = RunLogger(
        "cql", args, meta, seeds=seeds, total_steps=args.total_steps, online_steps=0, paper_steps=PAPER_STEPS,
        out_dir=args.out_dir, resume=args.resume, tensorboard=not args.no_log,
    )  # fmt: skip
    print(f"CQL on {args.dataset} ({meta.domain}, {meta.size} transitions): cql_alpha {args.cql_alpha}, "
          f"lagrange {args.cql_lagrange} (gap {args.target_action_gap}), "
          f"max backup {args.max_target_backup}, "
          f"policy lr {args.policy_lr}, actor {args.hidden_dims}, critics {args.critic_hidden_dims}, "
          f"state norm {args.normalize_states}, reward norm {args.normalize_rewards} "
          f"(x{args.reward_scale} {args.reward_bias:+})", flush=True)  # fmt: skip
    step = 0
    if args.resume:
        states, step, keys, _ = logger.load_checkpoint(states, keys)
        print(f"resumed from step {step}", flush=True)

    @jax.jit
    def policy(params, carry, obs, prev_reward, rng):  # obs: (num_seeds, episodes, obs_dim)
        return jax.vmap(lambda p, m, sd, o: act(p, m, sd, o, rng, True))(*params, obs), carry

    t0 = time.time()
    logger.progress(args.total_steps, initial=step, desc="offline")
    chunks: dict[int, object] = {}
    while step < args.total_steps:
        n = min(args.eval_every, args.total_steps - step)
        if n not in chunks:
            chunks[n] = make_train_chunk(update, args.batch_size, n)
        states, keys, metrics = chunks[n](states, keys, offline, hp)
        metrics = jax.device_get(metrics)
        bad = first_nonfinite(metrics, step, seeds)
        if bad:
            logger.close()
            raise FloatingPointError(
                f"non-finite loss, training stopped at {bad}; the last finite checkpoint is in {logger.run_dir}"
            )
        step += n
        logger.advance(n)
        logger.metrics(step, metrics)
        params = (states.params["actor"], states.obs_mean, states.obs_std)
        result = evaluate(meta, policy, params, num_episodes=args.eval_episodes, seed=args.seed)
        logger.evaluation(step, result, phase="offline")
        logger.save_checkpoint(states, step, keys, "offline")
    record = logger.close()
    final = record["final"]
    print(f"{args.total_steps} updates in {time.time() - t0:.0f} s; final normalized score "
          f"{final['normalized_mean']:.1f} ± {final['normalized_std']:.1f} (seeds {seeds}); "
          f"record: {logger.run_dir / 'record.json'}", flush=True)  # fmt: skip
    return record


if __name__ == "__main__":
    train(tyro.cli(Args))
