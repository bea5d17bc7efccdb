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
the max), Monte-Carlo returns of the scaled rewards per episode (no bootstrap at a time limit), a
mixing ratio of 0.5, one update per environment step online. This file is cql.py plus the bound:
the same names, order, networks, losses and presets wherever the two agree. What differs, on purpose:
- The bound: `calibrate` inside critic_loss, a Monte-Carlo return in every Batch row (`mc_returns`,
  on the host per dataset episode and per online trajectory), the flags --calibrate (off: plain
  CQL), --sparse-rewards and --failure-reward (an episode of only failure rewards is worth
  r_neg / (1 - gamma) at every step, as the official calc_return_to_go), the metrics mc_return and
  bound_rate (the official diagnostic: how often Q of a policy action is below the bound).
- The online phase: --online-steps, --mixing-ratio, --utd-ratio, --collect-steps, `sample_mixed`,
  the online buffer and `Trajectories`, and PAPER_STEPS = (1M, 1M) (run_antmaze.sh).
- AntMaze follows the official scripts/run_antmaze.sh, not CORL's CQL config: actor 2x256 and
  critics 4x256 (cql.py: 3x256 and 5x256), the gap unclipped (cql.py: -200), failure returns on.
- Dense rewards, which the official code does not support, are this repo's choice: cql.py's preset
  for the domain (CORL's: alpha_cql 10, no Lagrange, no max-target backup, 3x256 networks, state
  normalization) with rewards as they are (scale 1) on every dataset, so none of cql.py's
  per-dataset reward normalization (hopper-medium): DATASET_PRESETS is empty. PointMaze and
  Adroit, where the official code has no values either (its Adroit sets are binary-reward ones
  this repo does not have), likewise take cql.py's preset plus the bound.
- Dataset actions are clipped to +-0.99999 (the official clip_action; JaxCQL and cql.py: 0.999).

Online, every member's (seed's) environment runs continuously; after every `collect_steps`
environment steps (default: the time limit, one full-length trajectory) each member makes that many
updates (times `utd_ratio`). A transition enters the replay buffer when its trajectory ends, because its
Monte-Carlo return needs the end; the official code likewise collects a whole trajectory, then
updates. Every online evaluation checkpoints the online buffer and the environments' actions, so
`--resume` continues the phase exactly (the running trajectories are rebuilt by replaying them).

    python algorithms/cal_ql.py                                # local/hopper/medium-v0, 1M + 1M
    python algorithms/cal_ql.py --dataset local/pointmaze/umaze-sparse-v0 --num-seeds 2 \
        --total-steps 10000 --online-steps 10000
    python algorithms/cal_ql.py --resume runs/cal_ql/<run>     # continue a run from its checkpoint
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from functools import partial
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from common.data import UserError, load_dataset
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
    """a run directory to continue from its checkpoint, with its own config"""
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
    """offline gradient updates (the paper's 1M on AntMaze)"""
    online_steps: int = 1_000_000
    """online environment steps after the offline phase (0: offline only)"""
    eval_every: int = 5_000
    """updates (offline) or environment steps (online) between evaluations"""
    eval_episodes: int | None = None
    """evaluation episodes per seed (None: 10 on locomotion, 100 on mazes)"""
    batch_size: int = 256
    """transitions per update per seed"""
    hidden_dims: tuple[int, ...] | None = None
    """hidden sizes of the actor and the critics (None: preset, 256 256 256; AntMaze 256 256)"""
    critic_hidden_dims: tuple[int, ...] | None = None
    """hidden sizes of the critics only (None: --hidden-dims if given, else preset: 3x256, AntMaze 4x256)"""
    # --- SAC ---
    policy_lr: float | None = None
    """actor and entropy-temperature learning rate (None: preset 3e-5; AntMaze and Adroit 1e-4)"""
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
    """weight of the CQL gap (None: preset 10 locomotion and PointMaze, 5 AntMaze, 1 Adroit)"""
    cql_n_actions: int = 10
    """actions sampled per state from each of uniform, pi(.|s) and pi(.|s')"""
    cql_importance_sample: bool = True
    """importance-sampled CQL(H) (else the logsumexp also holds Q(s, a_data), unweighted)"""
    cql_temp: float = 1.0
    """temperature of the logsumexp"""
    cql_lagrange: bool | None = None
    """tune the CQL weight by dual gradient descent (None: preset, on for mazes)"""
    target_action_gap: float | None = None
    """gap the Lagrange form aims at (None: preset 0.8 AntMaze, 5 PointMaze; unused without Lagrange)"""
    max_target_backup: bool | None = None
    """Bellman target = max over cql_n_actions sampled a' of min Qbar (None: preset, on for AntMaze)"""
    cql_clip_diff_min: float | None = None
    """lower clip of the per-state gap (None: preset -inf)"""
    cql_clip_diff_max: float = float("inf")
    """upper clip of the per-state gap"""
    # --- Data ---
    normalize_states: bool | None = None
    """standardize observations with the dataset's mean and std (None: preset, off on AntMaze)"""
    normalize_rewards: bool | None = None
    """scale rewards by 1000 / (max - min episode return) (None: preset, off)"""
    reward_scale: float | None = None
    """r -> r * scale + bias after normalization (None: preset 1, AntMaze 10)"""
    reward_bias: float | None = None
    """(None: preset 0, AntMaze -5)"""
    # --- Cal-QL ---
    calibrate: bool = True
    """lower-bound the policy-action terms by the Monte-Carlo return (--no-calibrate: plain CQL)"""
    sparse_rewards: bool | None = None
    """an episode of only failure rewards gets r_neg / (1 - gamma) as its return (None: preset, AntMaze)"""
    failure_reward: float = 0.0
    """raw reward of a failed step in sparse tasks (r_neg is it scaled and biased)"""
    # --- Online ---
    mixing_ratio: float = 0.5
    """fraction of each online batch drawn from the offline data"""
    utd_ratio: int = 1
    """updates per online environment step"""
    collect_steps: int | None = None
    """environment steps between two rounds of updates (None: the environment's time limit)"""
    sweep: tuple[str, ...] = ()
    """hyperparameter grid trained with the seeds as one program, e.g. --sweep cql_alpha=1,5,10 tau=0.005,0.01"""


# Presets per domain: cql.py's (CORL's tuned configs) with rewards as they are, except AntMaze,
# which follows the official scripts/run_antmaze.sh (see the module docstring).
LOCOMOTION = dict(
    policy_lr=3e-5, hidden_dims=(256, 256, 256), critic_hidden_dims=(256, 256, 256), cql_alpha=10.0,
    cql_lagrange=False, target_action_gap=-1.0, max_target_backup=False, cql_clip_diff_min=-float("inf"),
    normalize_states=True, normalize_rewards=False, reward_scale=1.0, reward_bias=0.0, sparse_rewards=False,
)  # fmt: skip
ANTMAZE = dict(
    policy_lr=1e-4, hidden_dims=(256, 256), critic_hidden_dims=(256,) * 4, cql_alpha=5.0,
    cql_lagrange=True, target_action_gap=0.8, max_target_backup=True, cql_clip_diff_min=-float("inf"),
    normalize_states=False, normalize_rewards=False, reward_scale=10.0, reward_bias=-5.0, sparse_rewards=True,
)  # fmt: skip
MAZE2D = {**LOCOMOTION, "cql_lagrange": True, "target_action_gap": 5.0}
ADROIT = {**LOCOMOTION, "cql_alpha": 1.0, "policy_lr": 1e-4}
PRESETS = {"locomotion": LOCOMOTION, "antmaze": ANTMAZE, "pointmaze": MAZE2D, "adroit": ADROIT, "kitchen": LOCOMOTION}
# (robot, level) -> a dataset's own values over its domain's preset: none (rewards as they are everywhere).
DATASET_PRESETS: dict[tuple[str, str], dict] = {}
LOG_STD_MIN, LOG_STD_MAX = -20.0, 2.0
ACTION_CLIP = 0.99999  # the official clip_action
PAPER_STEPS = (1_000_000, 1_000_000)
# The traced continuous hyperparameters of Hyper (named as the flags): cql.py's but the discount,
# which also sets the Monte-Carlo returns computed on the host (one set for all members); not the 0/1
# switches (cql_lagrange, backup_entropy, calibrate), the bc_steps count, nor the clip bounds.
SWEEPABLE = ("cql_alpha", "cql_temp", "target_action_gap", "policy_lr", "qf_lr", "tau", "alpha_multiplier",
             "target_entropy")  # fmt: skip


def resolve(args: Args, meta) -> Args:
    """Fill the None fields from the dataset's preset (its domain's, refined by its robot and level);
    an explicit flag always wins."""
    preset = {**PRESETS[meta.domain], **DATASET_PRESETS.get((meta.robot, meta.level), {})}
    if args.hidden_dims is not None:  # --hidden-dims sizes every MLP unless the critics have their own
        preset["critic_hidden_dims"] = args.hidden_dims
    preset["eval_episodes"] = default_eval_episodes(meta.domain)
    return dataclasses.replace(args, **{k: v for k, v in preset.items() if getattr(args, k) is None})


def validate(args: Args) -> None:
    """Cal-QL's own flags, checked before anything loads (common's cli checks the shared ones)."""
    checks = [
        (args.cql_n_actions >= 1, f"--cql-n-actions must be at least 1, got {args.cql_n_actions}"),
        (args.cql_temp > 0, f"--cql-temp must be positive, got {args.cql_temp}"),
        (args.bc_steps >= 0, f"--bc-steps must be 0 or more, got {args.bc_steps}"),
        (0.0 <= args.discount < 1.0, f"--discount must be in [0, 1), got {args.discount}"),
        (0.0 < args.tau <= 1.0, f"--tau must be in (0, 1], got {args.tau}"),
        (args.qf_lr > 0, f"--qf-lr must be positive, got {args.qf_lr}"),
        (args.policy_lr is None or args.policy_lr > 0, f"--policy-lr must be positive, got {args.policy_lr}"),
        (0.0 <= args.mixing_ratio <= 1.0, f"--mixing-ratio must be in [0, 1], got {args.mixing_ratio}"),
        (args.utd_ratio >= 1, f"--utd-ratio must be at least 1, got {args.utd_ratio}"),
        (
            args.collect_steps is None or args.collect_steps >= 1,
            f"--collect-steps must be at least 1, got {args.collect_steps}",
        ),
    ]
    for ok, message in checks:
        if not ok:
            raise UserError(message)
    sweep_points(args.sweep, args, SWEEPABLE)


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


def sample_actions(mean, log_std, noise):
    """Reparameterized draws from standard-normal noise (..., n, A): actions (..., n, A), log-probs (..., n)."""
    mean, log_std = mean[..., None, :], log_std[..., None, :]
    pre_tanh = mean + jnp.exp(log_std) * noise
    return jnp.tanh(pre_tanh), tanh_gaussian_log_prob(mean, log_std, pre_tanh)


def q_multi(critic: Critics, params, obs, actions):
    """Q of M actions per state in one forward pass: obs (B, d), actions (B, M, A) -> (2, B, M). The
    critics see (B * M, d + A) rows: on XLA's CPU backend the weight gradients of 3-D dots (contracting
    B and M) ran ~2x slower than 2-D matmuls, and the update ~1.2x (results/throughput, matmuls)."""
    B, M, A = actions.shape
    obs = jnp.broadcast_to(obs[:, None, :], (B, M, obs.shape[-1])).reshape(B * M, -1)
    return critic.apply(params, obs, actions.reshape(B * M, A)).reshape(-1, B, M)


GROUPS = ("actor", "critic", "log_alpha", "log_alpha_prime")  # parameter groups, one loss and one Adam each


class TrainState(NamedTuple):
    """Everything one seed trains: `params` and `opt` hold the groups of GROUPS."""

    params: dict
    target_critic: dict
    opt: dict  # one optax Adam state per group
    obs_mean: jax.Array  # observation statistics of the dataset, used by the policy at evaluation
    obs_std: jax.Array
    step: jax.Array  # updates so far (the behaviour-cloning steps count from it)


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
    calibrate: jax.Array  # 0 or 1


class Batch(NamedTuple):
    observations: jax.Array
    actions: jax.Array
    rewards: jax.Array
    next_observations: jax.Array
    masks: jax.Array  # 1 - terminal: truncation still bootstraps
    mc_returns: jax.Array  # discounted Monte-Carlo return from the state, within its episode


class Proposals(NamedTuple):
    """The actions CQL's logsumexp samples at each data state s, with their log-densities; constants
    for the critics. a_next ~ pi(.|s') is evaluated at s too, as every implementation does."""

    rand: jax.Array  # (B, n, A) uniform in [-1, 1]
    next: jax.Array  # (B, n, A) from pi(.|s')
    logp_next: jax.Array  # (B, n)
    cur: jax.Array  # (B, n, A) from pi(.|s)
    logp_cur: jax.Array  # (B, n)


# --- The Cal-QL terms and the losses ----------------------------------------------------------
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


def calibrate(q_pi, mc_return, enabled=1.0):
    """Cal-QL's bound: Q of policy actions (2, B, N) lifted to at least the state's MC return (B,)."""
    lower = jnp.where(enabled > 0, mc_return, -jnp.inf)[None, :, None]
    return jnp.maximum(q_pi, lower)


def alpha_prime_of(log_alpha_prime):
    return jnp.clip(jnp.exp(log_alpha_prime), 0.0, 1e6)


def critic_loss(critic_params, critic: Critics, batch: Batch, target_q, proposals: Proposals, alpha_prime,
                hp: Hyper, importance_sample: bool):  # fmt: skip
    """Both critics' TD error plus the calibrated CQL gap, weighted by alpha_cql, or under Lagrange (a
    0/1 array, so one compiled update serves both forms) by alpha' * alpha_cql on gap -
    target_action_gap. All 1 + 3n actions per state go through the critics in one forward pass."""
    n = proposals.rand.shape[1]
    actions = jnp.concatenate([batch.actions[:, None], proposals.rand, proposals.next, proposals.cur], 1)
    q = q_multi(critic, critic_params, batch.observations, actions)  # (2, B, 1 + 3n)
    q_data, q_rand, q_pi = q[..., 0], q[..., 1 : 1 + n], q[..., 1 + n :]  # q_pi: pi(.|s') then pi(.|s) draws
    q_pi_cal = calibrate(q_pi, batch.mc_returns, hp.calibrate)
    gap, ood = cql_penalty(
        q_data, q_rand, q_pi_cal[..., :n], q_pi_cal[..., n:], proposals.logp_next, proposals.logp_cur,
        batch.actions.shape[-1], hp.cql_temp, hp.clip_diff_min, hp.clip_diff_max, importance_sample,
    )  # fmt: skip
    bellman = ((q_data - target_q) ** 2).mean(-1).sum()
    weight = jnp.where(hp.cql_lagrange > 0, alpha_prime, 1.0) * hp.cql_alpha
    loss = bellman + (weight * (gap - hp.cql_lagrange * hp.target_action_gap)).sum()
    return loss, {
        "critic_loss": loss,
        "bellman_loss": bellman,
        "cql_gap": gap.mean(),
        "q_data": q_data.mean(),
        "q_ood_logsumexp": ood.mean(),
        "target_q": target_q.mean(),
        "mc_return": batch.mc_returns.mean(),
        "bound_rate": (q_pi < batch.mc_returns[None, :, None]).mean(),  # the official diagnostic
    }


def actor_loss(actor_params, actor: Actor, critic: Critics, critic_params, batch: Batch, noise, alpha, step,
               hp: Hyper):  # fmt: skip
    """SAC's policy loss alpha log pi(a~|s) - min Q(s, a~), a~ the first of the draws reparameterized
    from `noise` (B, n, A), the CQL term's pi(.|s) draws (drawing all n keeps the numbers of one
    joint loss bit for bit); during the first bc_steps updates log pi(a_data|s) replaces Q (CORL)."""
    mean, log_std = actor.apply(actor_params, batch.observations)
    a, logp = sample_actions(mean, log_std, noise)
    q = critic.apply(critic_params, batch.observations, a[:, 0]).min(0)
    bc = tanh_gaussian_log_prob(mean, log_std, jnp.arctanh(batch.actions))
    loss = (alpha * logp[:, 0] - jnp.where(step < hp.bc_steps, bc, q)).mean()
    return loss, {"actor_loss": loss, "entropy": -logp[:, 0].mean()}


def temperature_loss(log_alpha, logp, hp: Hyper):
    """SAC's automatic entropy tuning: lowering it raises alpha while the entropy is below the target."""
    loss = -(log_alpha * (logp + hp.target_entropy)).mean()
    return loss, {"alpha_loss": loss}


def lagrange_loss(log_alpha_prime, gap, hp: Hyper):
    """Dual loss of the CQL weight: lowering it raises alpha' while the gap exceeds the target (zero
    without the Lagrange form)."""
    alpha_prime = alpha_prime_of(log_alpha_prime)
    loss = -hp.cql_lagrange * (alpha_prime * hp.cql_alpha * (gap - hp.target_action_gap)).mean()
    return loss, {"alpha_prime_loss": loss}


# --- The agent --------------------------------------------------------------------------------
def make_agent(args: Args, obs_dim: int, action_dim: int):
    """init, update and act for one seed, closed over the (static) architecture and switches."""
    actor, critic = Actor(args.hidden_dims, action_dim), Critics(args.critic_hidden_dims)
    n = args.cql_n_actions

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
        opt = {g: optax.adam(0.0).init(params[g]) for g in GROUPS}  # learning rates come from Hyper
        return TrainState(params, target, opt, obs_mean, obs_std, jnp.zeros((), jnp.int32))

    def update(s: TrainState, batch: Batch, key, hp: Hyper):
        k_rand, k_cur, k_next = jax.random.split(key, 3)
        B = batch.rewards.shape[0]
        alpha = jnp.exp(s.params["log_alpha"]) * hp.alpha_multiplier
        alpha_prime = hp.cql_lagrange * alpha_prime_of(s.params["log_alpha_prime"])

        # pi(.|s') serves the Bellman target (one sample, or all n for the max backup) and the CQL term.
        mean_n, log_std_n = actor.apply(s.params["actor"], batch.next_observations)
        a_next, logp_next = sample_actions(mean_n, log_std_n, jax.random.normal(k_next, (B, n, action_dim)))
        k_t = n if args.max_target_backup else 1
        q_next_t = q_multi(critic, s.target_critic, batch.next_observations, a_next[:, :k_t]).min(0)  # (B, k_t)
        best = jnp.argmax(q_next_t, -1)[:, None]  # k_t = 1: the single sample
        target_q = jnp.take_along_axis(q_next_t, best, -1)[:, 0]
        target_q = target_q - hp.backup_entropy * alpha * jnp.take_along_axis(logp_next, best, -1)[:, 0]
        y = batch.rewards + hp.discount * batch.masks * target_q
        # pi(.|s) for the CQL term; the actor loss reparameterizes the first of these draws.
        noise_cur = jax.random.normal(k_cur, (B, n, action_dim))
        mean, log_std = actor.apply(s.params["actor"], batch.observations)
        a_cur, logp_cur = sample_actions(mean, log_std, noise_cur)
        a_rand = jax.random.uniform(k_rand, (B, n, action_dim), minval=-1.0, maxval=1.0)
        proposals = Proposals(a_rand, a_next, logp_next, a_cur, logp_cur)

        # Every group's gradient at the same (old) parameters, then one Adam step each (JaxCQL).
        (_, critic_info), critic_grads = jax.value_and_grad(critic_loss, has_aux=True)(
            s.params["critic"], critic, batch, y, proposals, alpha_prime, hp, args.cql_importance_sample
        )
        (_, actor_info), actor_grads = jax.value_and_grad(actor_loss, has_aux=True)(
            s.params["actor"], actor, critic, s.params["critic"], batch, noise_cur, alpha, s.step, hp
        )
        (_, alpha_info), alpha_grads = jax.value_and_grad(temperature_loss, has_aux=True)(
            s.params["log_alpha"], logp_cur[:, 0], hp
        )
        (_, lagrange_info), lagrange_grads = jax.value_and_grad(lagrange_loss, has_aux=True)(
            s.params["log_alpha_prime"], critic_info["cql_gap"], hp
        )
        grads = {"actor": actor_grads, "critic": critic_grads, "log_alpha": alpha_grads,
                 "log_alpha_prime": lagrange_grads}  # fmt: skip
        lrs = {"actor": hp.policy_lr, "critic": hp.qf_lr, "log_alpha": hp.policy_lr, "log_alpha_prime": hp.qf_lr}
        params, opt = {}, {}
        for g in GROUPS:
            updates, opt[g] = optax.adam(lrs[g]).update(grads[g], s.opt[g])
            params[g] = optax.apply_updates(s.params[g], updates)
        target = optax.incremental_update(params["critic"], s.target_critic, hp.tau)
        metrics = {**critic_info, **actor_info, **alpha_info, **lagrange_info, "alpha": alpha,
                   "alpha_prime": alpha_prime}  # fmt: skip
        return TrainState(params, target, opt, s.obs_mean, s.obs_std, s.step + 1), metrics

    def act(actor_params, obs_mean, obs_std, obs, key, deterministic: bool):
        mean, log_std = actor.apply(actor_params, (obs - obs_mean) / obs_std)
        if deterministic:
            return jnp.tanh(mean)
        return jnp.tanh(mean + jnp.exp(log_std) * jax.random.normal(key, mean.shape))

    return init, update, act


def process_rewards(rewards: np.ndarray, meta, args: Args) -> np.ndarray:
    """CORL's reward handling: 1000 / (max - min episode return) where the preset says, then scale and bias."""
    if args.normalize_rewards:
        span = float(meta.episode_returns.max() - meta.episode_returns.min())
        rewards = rewards * (1000.0 / max(span, 1e-6))
    return rewards * args.reward_scale + args.reward_bias


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


def failure_return_reward(meta, args: Args) -> float | None:
    """The processed reward of a failed step where the preset says the task is sparse, else None."""
    return float(process_rewards(np.float64(args.failure_reward), meta, args)) if args.sparse_rewards else None


def sample_batch(data: Batch, key, batch_size: int) -> Batch:
    idx = jax.random.randint(key, (batch_size,), 0, data.rewards.shape[0])
    return jax.tree_util.tree_map(lambda x: x[idx], data)


def sample_mixed(data, key, batch_size: int, mixing_ratio: float) -> Batch:
    """int(mixing_ratio * B) offline rows (the official count), then the rest from this seed's n_online
    stored online rows (offline rows until the first trajectory is stored). data = (offline, online
    buffer, n_online)."""
    offline, online, n_online = data
    n_off = int(mixing_ratio * batch_size)
    k_off, k_on, k_fallback = jax.random.split(key, 3)
    idx = jax.random.randint(k_on, (batch_size - n_off,), 0, jnp.maximum(n_online, 1))
    on = jax.tree_util.tree_map(lambda x: x[idx], online)
    fallback = sample_batch(offline, k_fallback, batch_size - n_off)
    on = jax.tree_util.tree_map(lambda a, b: jnp.where(n_online > 0, a, b), on, fallback)
    off = sample_batch(offline, k_off, n_off)
    return jax.tree_util.tree_map(lambda a, b: jnp.concatenate([a, b]), off, on)


def make_train_chunk(update, sampler, num_updates: int, data_axes=None):
    """A jitted scan of `num_updates` updates, vmapped over the members (seeds times --sweep points,
    each with its own Hyper); batches drawn inside the scan by `sampler(data, key)` from
    device-resident data (data_axes: which of it has a member axis)."""

    def one_seed(state, key, data, hp):
        def body(carry, _):
            state, key = carry
            key, k_batch, k_update = jax.random.split(key, 3)
            state, metrics = update(state, sampler(data, k_batch), k_update, hp)
            return (state, key), metrics

        (state, key), metrics = jax.lax.scan(body, (state, key), None, length=num_updates)
        return state, key, metrics  # metrics: (num_updates,) each

    return jax.jit(vmap_members(one_seed, in_axes=(0, 0, data_axes, 0)), donate_argnums=(0,))


def hyper_values(args: Args, action_dim: int) -> dict:
    """Each Hyper field's value for a run without --sweep (the switches as 0 or 1)."""
    return dict(
        cql_alpha=args.cql_alpha, cql_lagrange=float(args.cql_lagrange), cql_temp=args.cql_temp,
        target_action_gap=args.target_action_gap, clip_diff_min=args.cql_clip_diff_min,
        clip_diff_max=args.cql_clip_diff_max, policy_lr=args.policy_lr, qf_lr=args.qf_lr,
        discount=args.discount, tau=args.tau, alpha_multiplier=args.alpha_multiplier,
        target_entropy=-float(action_dim) if args.target_entropy is None else args.target_entropy,
        backup_entropy=float(args.backup_entropy), bc_steps=args.bc_steps, calibrate=float(args.calibrate),
    )  # fmt: skip


def make_hyper(args: Args, action_dim: int) -> Hyper:
    """One member's Hyper, float32 scalars."""
    return Hyper(**{k: jnp.float32(v) for k, v in hyper_values(args, action_dim).items()})


# --- Online fine-tuning -----------------------------------------------------------------------
class Trajectories:
    """Each environment's unfinished trajectory, as (obs, action, reward, next_obs, terminal) steps.
    `add` takes one step of every environment (OnlineEnvs.step's, or its replay on resume) and
    returns the trajectories that ended at it, as (environment index, steps)."""

    def __init__(self, num_envs: int):
        self.running: list[list] = [[] for _ in range(num_envs)]

    def add(self, obs, actions, reward, term, trunc, true_next) -> list[tuple[int, list]]:
        ended = []
        for i, steps in enumerate(self.running):
            steps.append((obs[i], actions[i], float(reward[i]), true_next[i], bool(term[i])))
            if term[i] or trunc[i]:
                ended.append((i, steps))
                self.running[i] = []
        return ended


def stack_trajectories(trajectories, meta, args: Args, obs_mean, obs_std, block: int) -> tuple[Batch, int]:
    """Finished trajectories of one seed -> (a Batch of `block` rows, zero-padded; the real row count),
    with processed rewards and their Monte-Carlo returns, as the dataset's rows."""
    shapes = [(meta.obs_dim,), (meta.action_dim,), (), (meta.obs_dim,), (), ()]
    cols = [np.zeros((block,) + shape) for shape in shapes]
    k = 0
    for steps in trajectories:
        o, a, r, o2, d = (np.asarray(x) for x in zip(*steps))
        r = process_rewards(np.asarray(r, np.float64), meta, args)
        ends = np.zeros(len(r), bool)
        ends[-1] = True
        g = mc_returns(r, d, ends, args.discount, failure_return_reward(meta, args))
        if k + len(r) > block:
            raise RuntimeError(f"more than {block} online rows in one round: an episode outlived the time limit")
        for col, x in zip(cols, ((o - obs_mean) / obs_std, np.clip(a, -ACTION_CLIP, ACTION_CLIP), r,
                                 (o2 - obs_mean) / obs_std, 1.0 - d, g)):  # fmt: skip
            col[k : k + len(r)] = x
        k += len(r)
    return Batch(*(c.astype(np.float32) for c in cols)), k


@partial(jax.jit, donate_argnums=(0,))
def _insert(buf: Batch, n_online, rows: Batch) -> Batch:
    """Write each seed's block of rows at its own insertion index (the padding is overwritten later)."""

    def one(b, n, r):
        return jax.lax.dynamic_update_slice(b, r, (n,) + (0,) * (b.ndim - 1))

    return jax.tree_util.tree_map(jax.vmap(one), buf, jax.tree_util.tree_map(lambda _: n_online, buf), rows)


def online_phase(args, meta, states, keys, offline, update, act, hp, logger, policy, members, resume=None):
    """Fine-tune online, checkpointing at every evaluation; `resume` (a checkpoint of this phase)
    continues it exactly: same buffer, keys and environments (their actions replayed). `members`
    names the members (seeds, times the --sweep points): one environment and buffer each."""
    t = 0 if resume is None else resume.step
    if t >= args.online_steps:  # a finished phase is never run again
        return states, keys
    num_members = len(members)
    horizon = meta.env_spec.max_episode_steps or 1000
    collect = args.collect_steps or horizon
    block = collect + horizon  # trajectories finished in one collection round have fewer rows than this
    # Rows for every online step and one round's padding, rounded up to a multiple of 2^16 so that a
    # run extended with --resume --online-steps keeps its buffer shape and compiled programs.
    cap = -(-(args.online_steps + block) // 2**16) * 2**16
    shapes = [(meta.obs_dim,), (meta.action_dim,), (), (meta.obs_dim,), (), ()]
    buf = shard(Batch(*(jnp.zeros((num_members, cap) + shape) for shape in shapes)))  # (members, cap, ...)
    n_online = np.zeros(num_members, np.int32)
    trajectories = Trajectories(num_members)
    # Member m's environment resets as seed m % num_seeds's of a run without --sweep.
    envs = OnlineEnvs(meta, [args.seed + 1000 + i % args.num_seeds for i in range(num_members)])
    if resume is None:
        obs = envs.reset()
    else:
        saved = resume.online["buffer"]  # the filled rows only: (members, max n_online, ...)
        buf = shard(Batch(*(b.at[:, : np.shape(saved[f])[1]].set(saved[f]) for b, f in zip(buf, Batch._fields))))
        n_online = np.array(resume.online["n_online"], np.int32)  # a writable copy
        obs = envs.restore(resume.host, on_step=trajectories.add)  # rebuilds the running trajectories
        if len(envs.actions) != t:
            raise ValueError(f"the checkpoint holds {len(envs.actions)} environment steps, not {t}")
    mean, std = np.asarray(states.obs_mean[0]), np.asarray(states.obs_std[0])

    @jax.jit
    def explore(actor_params, obs_mean, obs_std, obs, keys):
        keys, k_act = jax.vmap(lambda k: tuple(jax.random.split(k)))(keys)
        return jax.vmap(lambda p, m, sd, o, k: act(p, m, sd, o, k, False))(
            actor_params, obs_mean, obs_std, obs, k_act
        ), keys

    chunks: dict[int, object] = {}
    logger.progress(args.online_steps, initial=t, desc="online")
    while t < args.online_steps:
        n = min(collect, args.online_steps - t, (t // args.eval_every + 1) * args.eval_every - t)
        finished = [[] for _ in members]
        for _ in range(n):
            actions, keys = explore(states.params["actor"], states.obs_mean, states.obs_std, jnp.asarray(obs), keys)
            actions = np.asarray(actions)
            next_obs, reward, term, trunc, true_next = envs.step(actions)
            for i, steps in trajectories.add(obs, actions, reward, term, trunc, true_next):
                finished[i].append(steps)
            obs = next_obs
        rows = [stack_trajectories(f, meta, args, mean, std, block) for f in finished]
        buf = _insert(buf, jnp.asarray(n_online), shard(Batch(*(jnp.stack(x) for x in zip(*[r[0] for r in rows])))))
        n_online += np.asarray([r[1] for r in rows], np.int32)
        if n * args.utd_ratio not in chunks:
            sampler = lambda data, k: sample_mixed(data, k, args.batch_size, args.mixing_ratio)  # noqa: E731
            chunks[n * args.utd_ratio] = make_train_chunk(update, sampler, n * args.utd_ratio, (None, 0, 0))
        data = (offline, buf, shard(jnp.asarray(n_online)))
        states, keys, metrics = chunks[n * args.utd_ratio](states, keys, data, hp)
        metrics = jax.device_get(metrics)
        bad = first_nonfinite(metrics, args.total_steps + t * args.utd_ratio, members)
        if bad:
            logger.stop_nonfinite(bad, f" in the online phase (environment step {t + n})")
        t += n
        logger.advance(n)
        if t % args.eval_every == 0 or t == args.online_steps:
            logger.metrics(args.total_steps + t * args.utd_ratio, metrics)
            params = (states.params["actor"], states.obs_mean, states.obs_std)
            result = evaluate(meta, policy, params, num_episodes=args.eval_episodes, seed=args.seed,
                              video=logger.video(t, "online"))  # fmt: skip
            logger.evaluation(t, result, phase="online")
            filled = int(n_online.max())
            online = {"buffer": Batch(*(x[:, :filled] for x in buf)), "n_online": n_online}
            logger.save_checkpoint(states, t, keys, "online", online=online, host=envs.state())
    envs.close()
    return states, keys


# --- Training ---------------------------------------------------------------------------------
def train(args: Args) -> dict:
    data, meta = load_dataset(args.dataset)
    args = resolve(args, meta)
    observations, next_observations = np.asarray(data.observations), np.asarray(data.next_observations)
    if args.normalize_states:  # CORL: statistics of the dataset's states, eps 1e-3
        obs_mean, obs_std = observations.mean(0), observations.std(0) + 1e-3
    else:
        obs_mean, obs_std = np.zeros(meta.obs_dim, np.float32), np.ones(meta.obs_dim, np.float32)
    rewards = process_rewards(np.asarray(data.rewards), meta, args)
    episode_ends = np.append(np.asarray(data.episode_starts)[1:], True)
    returns = mc_returns(rewards, data.terminals, episode_ends, args.discount, failure_return_reward(meta, args))
    offline = Batch(
        jnp.asarray((observations - obs_mean) / obs_std, jnp.float32),
        jnp.clip(data.actions, -ACTION_CLIP, ACTION_CLIP),
        jnp.asarray(rewards, jnp.float32),
        jnp.asarray((next_observations - obs_mean) / obs_std, jnp.float32),
        1.0 - data.terminals.astype(jnp.float32),
        jnp.asarray(returns),
    )
    offline = replicate(offline)
    init, update, act = make_agent(args, meta.obs_dim, meta.action_dim)
    # Members: every seed of every --sweep point (one point without --sweep), sharded over devices.
    points = sweep_points(args.sweep, args, SWEEPABLE)
    hp = shard(member_hyper(Hyper, args, points, args.num_seeds, **hyper_values(args, meta.action_dim)))
    seeds = list(range(args.seed, args.seed + args.num_seeds))
    members = member_labels(points, seeds)
    keys = jnp.stack([jax.random.key(s) for s in seeds])
    init_keys, keys = jax.vmap(lambda k: tuple(jax.random.split(k)))(keys)
    # One jitted init per seed, stacked: seed i starts exactly as a single-seed run would, and no
    # vmapped (batched) QR reaches jaxlib's thread-pool LAPACK (see Critics).
    init_one = jax.jit(init)
    mean_std = (jnp.float32(obs_mean), jnp.float32(obs_std))
    states = jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *[init_one(k, *mean_std) for k in init_keys])
    states, keys = shard(tile(states, len(points))), shard(tile(keys, len(points)))

    logger = RunLogger("cal_ql", args, meta, seeds=seeds, paper_steps=PAPER_STEPS, points=points)
    resolved = [*LOCOMOTION, "eval_episodes", "calibrate", "mixing_ratio"]
    print(f"Cal-QL on {args.dataset} ({meta.domain}, {meta.size} transitions), preset: "
          + ", ".join(f"{k} {getattr(args, k)}" for k in resolved)
          + (f"; sweep of {len(points)} points x {len(seeds)} seeds: {' '.join(args.sweep)}" if args.sweep else "")
          + (f"; members sharded over {jax.device_count()} devices" if jax.device_count() > 1 else ""),
          flush=True)  # fmt: skip
    step, phase, ck = 0, "offline", None
    if logger.resumed:
        ck = logger.load_checkpoint(states, keys)
        states, step, keys, phase = ck.state, ck.step, ck.rng, ck.phase
        print(f"resumed from step {step} ({phase})", flush=True)

    @jax.jit
    def policy(params, carry, obs, prev_reward, rng):  # obs: (members, episodes, obs_dim)
        return jax.vmap(lambda p, m, sd, o: act(p, m, sd, o, rng, True))(*params, obs), carry

    if args.eval_only:
        return logger.loaded(policy, (states.params["actor"], states.obs_mean, states.obs_std))
    t0 = time.time()
    if phase == "offline" and step < args.total_steps:
        logger.progress(args.total_steps, initial=step, desc="offline")
        chunks: dict[int, object] = {}
        while step < args.total_steps:
            n = min(args.eval_every, args.total_steps - step)
            if n not in chunks:
                chunks[n] = make_train_chunk(update, lambda data, k: sample_batch(data, k, args.batch_size), n)
            states, keys, metrics = chunks[n](states, keys, offline, hp)
            metrics = jax.device_get(metrics)
            bad = first_nonfinite(metrics, step, members)
            if bad:
                logger.stop_nonfinite(bad)
            step += n
            logger.advance(n)
            logger.metrics(step, metrics)
            params = (states.params["actor"], states.obs_mean, states.obs_std)
            result = evaluate(meta, policy, params, num_episodes=args.eval_episodes, seed=args.seed,
                              video=logger.video(step))  # fmt: skip
            logger.evaluation(step, result, phase="offline")
            logger.save_checkpoint(states, step, keys, "offline")
        print(f"offline: {args.total_steps} updates ({time.time() - t0:.0f} s in this session), "
              f"normalized {logger.record['final']['normalized_mean']:.1f}", flush=True)  # fmt: skip
    if args.online_steps > 0:
        resume = ck if phase == "online" else None
        states, keys = online_phase(args, meta, states, keys, offline, update, act, hp, logger, policy, members, resume)
    record = logger.close()
    final = record["final"]
    print(f"final normalized score {final['normalized_mean']:.1f} ± {final['normalized_std']:.1f} "
          f"(seeds {seeds}); record: {logger.run_dir / 'record.json'}", flush=True)  # fmt: skip
    return record


if __name__ == "__main__":
    cli(Args, train, validate=validate)
