"""Calibrated Q-Learning (Cal-QL): Nakamoto, Zhai, Singh, Sobol Mark, Ma, Finn, Kumar and Levine,
"Cal-QL: Calibrated Offline RL Pre-Training for Efficient Online Fine-Tuning", NeurIPS 2023.
https://arxiv.org/abs/2303.05479

CQL pre-trains a critic that is conservative but can be far below the true values, so online
fine-tuning first "unlearns" the pessimism and the policy collapses for a while. Cal-QL keeps the
critic calibrated: inside CQL's logsumexp, the Q-values of the policy's actions are lower-bounded by
the Monte-Carlo return of the (behaviour or online) policy from the state, so CQL stops pushing them
down once they reach a reference policy's value. Everything else is CQL; the same losses run
offline, then online on batches that mix offline and online transitions.

Follows the official code (nakamotoo/Cal-QL, a fork of young-geng/JaxCQL): the bound on the
pi(.|s) and pi(.|s') terms only (uniform-action and data terms unbounded, log-probs subtracted after
the max), Monte-Carlo returns of the scaled rewards per episode (no bootstrap at a time limit; an
episode of only failure rewards gets r_neg / (1 - gamma) everywhere), a mixing ratio of 0.5, one
update per environment step online, the AntMaze preset (Lagrange with gap 0.8, max-target backup,
r -> 10 r - 5, 4x256 critics), also used for PointMaze. Dense rewards (locomotion), which the
official code does not support, are this repo's choice: CQL's locomotion preset (CORL's tuned
values: alpha 10, no Lagrange, no max backup, 3x256 networks, state normalization, rewards scaled by
1000 / (max - min episode return)) plus the Monte-Carlo bound.

Online, every seed's environment runs continuously; after every `collect_steps` environment steps
(default: the time limit, one full-length trajectory) each seed makes that many updates (times
`utd_ratio`). A transition enters the replay buffer when its trajectory ends, because its
Monte-Carlo return needs the end; the official code likewise collects a whole trajectory, then updates.

    python algorithms/cal_ql.py                                # local/hopper/medium-v0, 1M + 1M
    python algorithms/cal_ql.py --dataset local/pointmaze/umaze-sparse-v0 --num-seeds 2 \
        --total-steps 10000 --online-steps 10000
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from functools import partial
from typing import NamedTuple

import flax.linen as nn
import gymnasium as gym
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
    """offline gradient updates (the paper's 1M on AntMaze)"""
    online_steps: int = 1_000_000
    """online environment steps after the offline phase (0: offline only)"""
    eval_every: int = 5_000
    """updates (offline) or environment steps (online) between evaluations"""
    eval_episodes: int = 10
    """evaluation episodes per seed"""
    batch_size: int = 256
    """transitions per update per seed"""
    hidden_dims: tuple[int, ...] | None = None
    """hidden sizes of the actor and the critics (None: preset, 256 256 256; mazes 256 256)"""
    critic_hidden_dims: tuple[int, ...] | None = None
    """hidden sizes of the critics only (None: --hidden-dims if given, else preset: 3x256, mazes 4x256)"""
    # --- Online ---
    mixing_ratio: float = 0.5
    """fraction of each online batch drawn from the offline data"""
    utd_ratio: int = 1
    """updates per online environment step"""
    collect_steps: int | None = None
    """environment steps between two rounds of updates (None: the environment's time limit)"""
    # --- SAC ---
    policy_lr: float | None = None
    """actor and entropy-temperature learning rate (None: preset 3e-5 dense rewards, 1e-4 mazes)"""
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
    # --- CQL / Cal-QL ---
    calibrate: bool = True
    """lower-bound the policy-action terms by the Monte-Carlo return (--no-calibrate: plain CQL)"""
    cql_alpha: float | None = None
    """weight of the CQL gap (None: preset 10 dense rewards, 5 mazes)"""
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
    cql_clip_diff_min: float = -float("inf")
    """lower clip of the per-state gap"""
    cql_clip_diff_max: float = float("inf")
    """upper clip of the per-state gap"""
    # --- Data ---
    normalize_states: bool | None = None
    """standardize observations with the dataset's mean and std (None: preset, dense rewards only)"""
    normalize_rewards: bool | None = None
    """scale rewards by 1000 / (max - min episode return) (None: preset, dense rewards only)"""
    reward_scale: float | None = None
    """r -> r * scale + bias after normalization (None: preset 1 dense, 10 mazes)"""
    reward_bias: float | None = None
    """(None: preset 0 dense, -5 mazes)"""
    sparse_rewards: bool | None = None
    """an episode of only failure rewards gets r_neg / (1 - gamma) as its return (None: preset, mazes)"""
    failure_reward: float = 0.0
    """raw reward of a failed step in sparse tasks (r_neg is it scaled and biased)"""


_DENSE = dict(
    policy_lr=3e-5, hidden_dims=(256, 256, 256), critic_hidden_dims=(256, 256, 256), cql_alpha=10.0,
    cql_lagrange=False, target_action_gap=-1.0, max_target_backup=False, normalize_states=True,
    normalize_rewards=True, reward_scale=1.0, reward_bias=0.0, sparse_rewards=False,
)  # fmt: skip
_MAZE = dict(  # the official scripts/run_antmaze.sh
    policy_lr=1e-4, hidden_dims=(256, 256), critic_hidden_dims=(256,) * 4, cql_alpha=5.0, cql_lagrange=True,
    target_action_gap=0.8, max_target_backup=True, normalize_states=False, normalize_rewards=False,
    reward_scale=10.0, reward_bias=-5.0, sparse_rewards=True,
)  # fmt: skip
PRESETS = {"locomotion": _DENSE, "antmaze": _MAZE, "pointmaze": _MAZE, "adroit": _DENSE, "kitchen": _DENSE}
LOG_STD_MIN, LOG_STD_MAX = -20.0, 2.0
ACTION_CLIP = 0.99999  # the official clip_action
PAPER_STEPS = (1_000_000, 1_000_000)


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
    obs_mean: jax.Array  # observation statistics of the dataset, used by the policy when it acts
    obs_std: jax.Array


class Hyper(NamedTuple):
    """Numeric hyperparameters that do not change shapes, as float32 arrays (vmappable)."""

    calibrate: jax.Array  # 0 or 1
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


class Batch(NamedTuple):
    observations: jax.Array
    actions: jax.Array
    rewards: jax.Array
    next_observations: jax.Array
    masks: jax.Array  # 1 - terminal: truncation still bootstraps
    mc_returns: jax.Array  # discounted Monte-Carlo return from the state, within its episode


# --- Monte-Carlo returns (host, once per dataset and per online trajectory) --------------------
def mc_returns(rewards, terminals, episode_ends, discount: float, failure_reward: float | None = None) -> np.ndarray:
    """Discounted return-to-go within each episode, G_t = r_t + gamma (1 - d_t) G_{t+1}, as the
    official calc_return_to_go: an episode cut by a time limit is not bootstrapped (for rewards
    >= 0 that only lowers the bound). With `failure_reward` (the scaled r_neg of a sparse task), an
    episode whose rewards all equal it gets r_neg / (1 - gamma) at every step, the value of failing
    forever. Flat arrays of whole episodes; `episode_ends` marks each episode's last transition."""
    rewards, terminals = np.asarray(rewards, np.float64), np.asarray(terminals, bool)
    out = np.empty(len(rewards))
    start = 0
    for end in np.flatnonzero(episode_ends):
        r = rewards[start : end + 1]
        if failure_reward is not None and np.allclose(r, failure_reward):
            out[start : end + 1] = failure_reward / (1.0 - discount)
        else:
            g, rs, ds = 0.0, r.tolist(), terminals[start : end + 1].tolist()
            for t in range(len(rs) - 1, -1, -1):
                g = rs[t] + discount * g * (1.0 - ds[t])
                out[start + t] = g
        start = end + 1
    return out.astype(np.float32)


# --- The Cal-QL terms and the update ----------------------------------------------------------
def calibrate(q_pi, mc_return, enabled=1.0):
    """Cal-QL's bound: Q of policy actions (2, B, N) lifted to at least the state's MC return (B,)."""
    lower = jnp.where(enabled > 0, mc_return, -jnp.inf)[None, :, None]
    return jnp.maximum(q_pi, lower)


def cql_penalty(q_data, q_rand, q_next, q_cur, logp_next, logp_cur, action_dim: int, temp, clip_min, clip_max,
                importance_sample: bool = True):  # fmt: skip
    """The CQL(H) gap of each critic: mean over states of clip(temp * logsumexp(X / temp) - Q(s, a_data)).

    q_data (2, B); q_rand, q_next, q_cur (2, B, N), all at the data state s (a_next ~ pi(.|s') too);
    logp_next, logp_cur (B, N). With importance sampling X = [Q(s, a_rand) - log 0.5^|A|,
    Q(s, a_next) - log pi(a_next|s'), Q(s, a_cur) - log pi(a_cur|s)]; without, X = [Q(s, a_rand),
    Q(s, a_data), Q(s, a_next), Q(s, a_cur)]. Returns (gap (2,), logsumexp term (2, B)).
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
        return TrainState(params, target, adam.init(params), obs_mean, obs_std)

    def update(s: TrainState, batch: Batch, key, hp: Hyper):
        k_rand, k_cur, k_next = jax.random.split(key, 3)
        B = batch.rewards.shape[0]
        alpha = jnp.exp(s.params["log_alpha"]) * hp.alpha_multiplier

        # pi(.|s') serves the Bellman target (one sample, or all n for the max backup) and the CQL term.
        mean_n, log_std_n = actor.apply(s.params["actor"], batch.next_observations)
        a_next, logp_next = sample_actions(mean_n, log_std_n, k_next, n)  # (B, n, A), (B, n)
        k_t = n if args.max_target_backup else 1
        target_q = q_multi(critic, s.target_critic, batch.next_observations, a_next[:, :k_t]).min(0).max(-1)
        y = batch.rewards + hp.discount * batch.masks * target_q  # deterministic backup (official default)
        a_rand = jax.random.uniform(k_rand, (B, n, action_dim), minval=-1.0, maxval=1.0)

        def loss_fn(params):
            # Actor and temperature: SAC's losses on pi(.|s); its first sample is a~ of the actor loss.
            mean, log_std = actor.apply(params["actor"], batch.observations)
            a_cur, logp_cur = sample_actions(mean, log_std, k_cur, n)
            q_pi = critic.apply(jax.lax.stop_gradient(params["critic"]), batch.observations, a_cur[:, 0]).min(0)
            actor_loss = (jax.lax.stop_gradient(alpha) * logp_cur[:, 0] - q_pi).mean()
            alpha_loss = -(params["log_alpha"] * jax.lax.stop_gradient(logp_cur[:, 0] + hp.target_entropy)).mean()

            # Critics: TD error plus the calibrated CQL gap; all 1 + 3n actions in one forward pass.
            a_cur, logp_cur = jax.lax.stop_gradient((a_cur, logp_cur))
            actions = jnp.concatenate([batch.actions[:, None], a_rand, a_next, a_cur], 1)
            q = q_multi(critic, params["critic"], batch.observations, actions)  # (2, B, 1 + 3n)
            q_data, q_rand = q[..., 0], q[..., 1 : 1 + n]
            q_pi_all = q[..., 1 + n :]  # pi(.|s') then pi(.|s) samples
            q_pi_cal = calibrate(q_pi_all, batch.mc_returns, hp.calibrate)
            gap, ood = cql_penalty(
                q_data, q_rand, q_pi_cal[..., :n], q_pi_cal[..., n:], logp_next, logp_cur, action_dim,
                hp.cql_temp, hp.clip_diff_min, hp.clip_diff_max, args.cql_importance_sample,
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
                "mc_return": batch.mc_returns.mean(),
                "bound_rate": (q_pi_all < batch.mc_returns[None, :, None]).mean(),  # official diagnostic
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
        return TrainState(params, target, opt, s.obs_mean, s.obs_std), metrics

    def act(actor_params, obs_mean, obs_std, obs, key, deterministic: bool):
        mean, log_std = actor.apply(actor_params, (obs - obs_mean) / obs_std)
        if deterministic:
            return jnp.tanh(mean)
        return jnp.tanh(mean + jnp.exp(log_std) * jax.random.normal(key, mean.shape))

    return init, update, act


def sample_batch(data: Batch, key, batch_size: int) -> Batch:
    idx = jax.random.randint(key, (batch_size,), 0, data.rewards.shape[0])
    return jax.tree_util.tree_map(lambda x: x[idx], data)


def sample_mixed(data, key, batch_size: int, mixing_ratio: float) -> Batch:
    """mixing_ratio * B offline rows, the rest from this seed's n_online stored online rows (offline
    rows until the first trajectory is stored). data = (offline, online buffer, n_online)."""
    offline, online, n_online = data
    n_off = int(round(mixing_ratio * batch_size))
    k_off, k_on, k_fallback = jax.random.split(key, 3)
    idx = jax.random.randint(k_on, (batch_size - n_off,), 0, jnp.maximum(n_online, 1))
    on = jax.tree_util.tree_map(lambda x: x[idx], online)
    fallback = sample_batch(offline, k_fallback, batch_size - n_off)
    on = jax.tree_util.tree_map(lambda a, b: jnp.where(n_online > 0, a, b), on, fallback)
    off = sample_batch(offline, k_off, n_off)
    return jax.tree_util.tree_map(lambda a, b: jnp.concatenate([a, b]), off, on)


def make_train_chunk(update, sampler, num_updates: int, data_axes):
    """A jitted scan of `num_updates` updates, vmapped over seeds; batches drawn inside the scan by
    `sampler(data, key)` from device-resident data (data_axes: which of it has a seed axis)."""

    def one_seed(state, key, data, hp):
        def body(carry, _):
            state, key = carry
            key, k_batch, k_update = jax.random.split(key, 3)
            state, metrics = update(state, sampler(data, k_batch), k_update, hp)
            return (state, key), metrics

        (state, key), metrics = jax.lax.scan(body, (state, key), None, length=num_updates)
        return state, key, metrics  # metrics: (num_updates,) each

    return jax.jit(jax.vmap(one_seed, in_axes=(0, 0, data_axes, None)), donate_argnums=(0,))


# --- Online fine-tuning -----------------------------------------------------------------------
@partial(jax.jit, donate_argnums=(0,))
def _insert(buf: Batch, n_online, rows: Batch) -> Batch:
    """Write each seed's block of rows at its own insertion index (the padding is overwritten later)."""

    def one(b, n, r):
        return jax.lax.dynamic_update_slice(b, r, (n,) + (0,) * (b.ndim - 1))

    return jax.tree_util.tree_map(jax.vmap(one), buf, jax.tree_util.tree_map(lambda _: n_online, buf), rows)


def online_phase(args, meta, states, keys, offline, update, act, hp, logger, policy, process, seeds):
    num_seeds = len(seeds)
    envs = gym.vector.SyncVectorEnv(
        [meta.make_env for _ in range(num_seeds)], autoreset_mode=gym.vector.AutoresetMode.SAME_STEP
    )
    horizon = meta.env_spec.max_episode_steps or 1000
    collect = args.collect_steps or horizon
    block = collect + horizon  # trajectories finished in one collection round have fewer rows than this
    obs_dim, action_dim = meta.obs_dim, meta.action_dim
    cap = args.online_steps + block
    shapes = [(obs_dim,), (action_dim,), (), (obs_dim,), (), ()]
    buf = Batch(*(jnp.zeros((num_seeds, cap) + shape) for shape in shapes))  # (num_seeds, cap, ...)
    n_online = np.zeros(num_seeds, np.int32)
    mean, std = np.asarray(states.obs_mean[0]), np.asarray(states.obs_std[0])

    @jax.jit
    def explore(actor_params, obs_mean, obs_std, obs, keys):
        keys, k_act = jax.vmap(lambda k: tuple(jax.random.split(k)))(keys)
        return jax.vmap(lambda p, m, sd, o, k: act(p, m, sd, o, k, False))(
            actor_params, obs_mean, obs_std, obs, k_act
        ), keys

    chunks: dict[int, object] = {}
    # The unfinished trajectory of each seed, as (obs, action, reward, next_obs, terminal) tuples.
    running = [[] for _ in seeds]
    obs = meta.flatten_obs(envs.reset(seed=[args.seed + 1000 + i for i in range(num_seeds)])[0])
    low, high = meta.action_space.low, meta.action_space.high
    logger.progress(args.online_steps, desc="online")
    t = 0
    while t < args.online_steps:
        n = min(collect, args.online_steps - t, (t // args.eval_every + 1) * args.eval_every - t)
        finished = [[] for _ in seeds]
        for _ in range(n):
            actions, keys = explore(states.params["actor"], states.obs_mean, states.obs_std, jnp.asarray(obs), keys)
            actions = np.asarray(actions)
            next_obs, reward, term, trunc, info = envs.step(np.clip(actions, low, high))
            next_flat = meta.flatten_obs(next_obs)
            for i in range(num_seeds):
                # SAME_STEP autoreset: the true last observation of an ended episode is in final_obs
                true_next = meta.flatten_obs(info["final_obs"][i]) if term[i] or trunc[i] else next_flat[i]
                running[i].append((obs[i], actions[i], float(reward[i]), true_next, bool(term[i])))
                if term[i] or trunc[i]:
                    finished[i].append(running[i])
                    running[i] = []
            obs = next_flat
        rows = [stack_trajectories(f, process, args, mean, std, block, obs_dim, action_dim) for f in finished]
        buf = _insert(buf, jnp.asarray(n_online), Batch(*(jnp.stack(x) for x in zip(*[r[0] for r in rows]))))
        n_online += np.asarray([r[1] for r in rows], np.int32)
        if n * args.utd_ratio not in chunks:
            sampler = lambda data, k: sample_mixed(data, k, args.batch_size, args.mixing_ratio)  # noqa: E731
            chunks[n * args.utd_ratio] = make_train_chunk(update, sampler, n * args.utd_ratio, (None, 0, 0))
        states, keys, metrics = chunks[n * args.utd_ratio](states, keys, (offline, buf, jnp.asarray(n_online)), hp)
        metrics = jax.device_get(metrics)
        bad = first_nonfinite(metrics, args.total_steps + t * args.utd_ratio, seeds)
        if bad:
            raise FloatingPointError(f"non-finite loss in online training (environment step {t + n}), stopped at {bad}")
        t += n
        logger.advance(n)
        if t % args.eval_every == 0 or t == args.online_steps:
            logger.metrics(args.total_steps + t * args.utd_ratio, metrics)
            params = (states.params["actor"], states.obs_mean, states.obs_std)
            result = evaluate(meta, policy, params, num_episodes=args.eval_episodes, seed=args.seed)
            logger.evaluation(t, result, phase="online")
    envs.close()
    return states, keys


def stack_trajectories(trajectories, process, args, obs_mean, obs_std, block, obs_dim, action_dim):
    """Finished trajectories of one seed -> (a Batch of `block` rows, zero-padded; the real row count),
    with processed rewards and their Monte-Carlo returns."""
    shapes = [(obs_dim,), (action_dim,), (), (obs_dim,), (), ()]
    cols = [np.zeros((block,) + shape) for shape in shapes]
    k = 0
    for traj in trajectories:
        o, a, r, o2, d = (np.asarray(x) for x in zip(*traj))
        r = process(r)
        ends = np.zeros(len(r), bool)
        ends[-1] = True
        failure = args.failure_reward * args.reward_scale + args.reward_bias if args.sparse_rewards else None
        g = mc_returns(r, d, ends, args.discount, failure)
        if k + len(r) > block:
            raise RuntimeError(f"more than {block} online rows in one round: an episode outlived the time limit")
        for col, x in zip(cols, ((o - obs_mean) / obs_std, np.clip(a, -ACTION_CLIP, ACTION_CLIP), r,
                                 (o2 - obs_mean) / obs_std, 1.0 - d, g)):  # fmt: skip
            col[k : k + len(r)] = x
        k += len(r)
    return Batch(*(c.astype(np.float32) for c in cols)), k


def make_hyper(args: Args, action_dim: int) -> Hyper:
    values = dict(
        calibrate=float(args.calibrate), cql_alpha=args.cql_alpha, cql_lagrange=float(args.cql_lagrange),
        cql_temp=args.cql_temp, target_action_gap=args.target_action_gap,
        clip_diff_min=args.cql_clip_diff_min, clip_diff_max=args.cql_clip_diff_max, policy_lr=args.policy_lr,
        qf_lr=args.qf_lr, discount=args.discount, tau=args.tau, alpha_multiplier=args.alpha_multiplier,
        target_entropy=-float(action_dim) if args.target_entropy is None else args.target_entropy,
    )  # fmt: skip
    return Hyper(**{k: jnp.float32(v) for k, v in values.items()})


# --- Training ---------------------------------------------------------------------------------
def train(args: Args) -> dict:
    data, meta = load_dataset(args.dataset)
    args = resolve(args, meta.domain)
    span = float(meta.episode_returns.max() - meta.episode_returns.min())
    scale = (1000.0 / max(span, 1e-6) if args.normalize_rewards else 1.0) * args.reward_scale

    def process(r):  # CORL's locomotion normalization, then the official scale and bias
        return np.asarray(r, np.float64) * scale + args.reward_bias

    observations, next_observations = np.asarray(data.observations), np.asarray(data.next_observations)
    if args.normalize_states:  # CORL: statistics of the dataset's states, eps 1e-3
        obs_mean, obs_std = observations.mean(0), observations.std(0) + 1e-3
    else:
        obs_mean, obs_std = np.zeros(meta.obs_dim, np.float32), np.ones(meta.obs_dim, np.float32)
    rewards, terminals = process(np.asarray(data.rewards)), np.asarray(data.terminals)
    episode_ends = np.append(np.asarray(data.episode_starts)[1:], True)
    failure = args.failure_reward * args.reward_scale + args.reward_bias if args.sparse_rewards else None
    offline = Batch(
        jnp.asarray((observations - obs_mean) / obs_std, jnp.float32),
        jnp.clip(data.actions, -ACTION_CLIP, ACTION_CLIP),
        jnp.asarray(rewards, jnp.float32),
        jnp.asarray((next_observations - obs_mean) / obs_std, jnp.float32),
        1.0 - data.terminals.astype(jnp.float32),
        jnp.asarray(mc_returns(rewards, terminals, episode_ends, args.discount, failure)),
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
        "cal_ql", args, meta, seeds=seeds, total_steps=args.total_steps, online_steps=args.online_steps,
        paper_steps=PAPER_STEPS, out_dir=args.out_dir, resume=args.resume, tensorboard=not args.no_log,
    )  # fmt: skip
    print(f"Cal-QL on {args.dataset} ({meta.domain}, {meta.size} transitions): calibrate {args.calibrate}, "
          f"cql_alpha {args.cql_alpha}, lagrange {args.cql_lagrange} (gap {args.target_action_gap}), "
          f"max backup {args.max_target_backup}, policy lr {args.policy_lr}, actor {args.hidden_dims}, "
          f"critics {args.critic_hidden_dims}, state norm {args.normalize_states}, reward x{scale:.4g} "
          f"{args.reward_bias:+}, sparse {args.sparse_rewards}, mixing {args.mixing_ratio}",
          flush=True)  # fmt: skip
    step, phase = 0, "offline"
    if args.resume:
        states, step, keys, phase = logger.load_checkpoint(states, keys)
        print(f"resumed from step {step} ({phase})", flush=True)

    @jax.jit
    def policy(params, carry, obs, prev_reward, rng):  # obs: (num_seeds, episodes, obs_dim)
        return jax.vmap(lambda p, m, sd, o: act(p, m, sd, o, rng, True))(*params, obs), carry

    t0 = time.time()
    if phase == "offline" and step < args.total_steps:
        logger.progress(args.total_steps, initial=step, desc="offline")
        chunks: dict[int, object] = {}
        while step < args.total_steps:
            n = min(args.eval_every, args.total_steps - step)
            if n not in chunks:
                sampler = lambda data, k: sample_batch(data, k, args.batch_size)  # noqa: E731
                chunks[n] = make_train_chunk(update, sampler, n, None)
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
        print(f"offline: {args.total_steps} updates in {time.time() - t0:.0f} s, "
              f"normalized {logger.record['final']['normalized_mean']:.1f}", flush=True)  # fmt: skip
    if args.online_steps > 0:
        states, keys = online_phase(args, meta, states, keys, offline, update, act, hp, logger, policy, process, seeds)
        logger.save_checkpoint(states, args.online_steps, keys, "online")
    record = logger.close()
    final = record["final"]
    print(f"final normalized score {final['normalized_mean']:.1f} ± {final['normalized_std']:.1f} "
          f"(seeds {seeds}); record: {logger.run_dir / 'record.json'}", flush=True)  # fmt: skip
    return record


if __name__ == "__main__":
    train(tyro.cli(Args))
