"""MOREC: Luo, Xu, Cao and Yu, "Reward-Consistent Dynamics Models are Strongly Generalizable for Offline
Reinforcement Learning", ICLR 2024. https://arxiv.org/abs/2310.05422

A learnt dynamics model goes wrong off the data, and offline model-based RL either trusts it for a few
steps only (MOPO's 5-step rollouts) or penalizes its uncertainty. MOREC learns a second thing from the
data: a "dynamics reward" r_D(s, a, s'), found by adversarial imitation in the dynamics MDP (the
model is the agent, (s, a) its state, s' its action) and so consistent across the transitions of the
true dynamics. It then uses r_D as a filter in every model step: K = 10 candidate transitions (5
elites x 2 Gaussian samples), keep the one r_D likes most (or sample from softmax(r_D / 0.1)), and
end the rollout as a terminal where even the chosen one scores below 0.6. With the filter, 100-step
rollouts are usable, where plain MOPO needs 5.

Follows the official code (polixir/morec, MOREC-MOPO on OfflineRL-Kit): the ensemble of 7 Gaussian
4x200 SiLU MLPs on standardized (s, a) with PETS' soft log-variance bounds, per-layer L2, a bootstrap
set per member, holdout min(20%, 1000 rows), stopped after 5 epochs in which no member improved its
holdout MSE by 1%, 5 elites (offlinerlkit/dynamics/ensemble_dynamics.py: train); the filter and the
termination in `step` (candidates clipped to +-25; r_D = -log(1 - mean_i clip(sigmoid(l_i), 0, 1) +
1e-9) over the snapshot ensemble, each logit l_i clipped to its snapshot's [learner, expert] logit
values and mapped to [-1, 1]: models/discriminator_ensemble_loader.py with load_min_max False); the
MOPO penalty r - lambda max_e |sigma_e(s, a)|_2 over all 7 members ("aleatoric", on the (s', r)
standard deviations); SAC with 2 critics (critics -> actor -> alpha, alpha = exp(log alpha) clipped
to at most 1, as OfflineRL-Kit's SACPolicy), actor lr 1e-4 cosine-annealed, critics 3e-4, alpha
1e-4, 256-256, batches 5% dataset and 95% model rows, 2000 rollouts of 100 steps every 1000 updates,
the model buffer 5 rounds deep (FIFO); the last 400 discriminator snapshots, every 10th used.

The dynamics-reward TRAINING code is not released (the authors ship pretrained discriminators), so this
file implements it itself, as this repo's choice: a discriminator D(s, a, s' - s) on standardized
inputs (an MLP, not DARL's "restrain" encoder with its mutual-information term) is trained with the
logistic GAN loss to tell dataset transitions (label 1, "expert") from the generator's samples (0,
"learner"); the generator is a Gaussian dynamics network trained FROM SCRATCH (as GAIL's policy) to
make D call its reparameterized samples real, plus its Gaussian NLL on the data so that it becomes a
dynamics model. This is a ONE-STEP dynamics MDP (the generator gets the pathwise gradient of log D at
each transition), not DARL's multi-step policy-gradient training of the model. After every iteration
of `--reward-steps-per-iteration` updates a snapshot is kept, with its mean logit on a fixed probe set
of dataset transitions (expert value) and of generator samples on them (learner value), which is what
the official inference normalizes by. The snapshots thus span generators from poor to good, and
r_D rejects transitions in proportion to how far they are from the data. (Starting the generator from
the best elite, as this file first did, leaves nothing to learn where the model fits the data: on
local/hopper/medium-v0 the discriminator stayed at chance (accuracy 0.507) and the normalization
turned its noise into an r_D that ended rollouts after 17 steps, results/findings.md; the test on a
linear system reproduces it: r_D below the 0.6 threshold on 37% of the data's own transitions.) The
record's dynamics.reward.check measures this: the fraction of dataset transitions and of elite-model
samples below the threshold, and the AUC of dataset transitions against the same ones with next
states perturbed by 0.2 standard deviations of s' - s.

Other differences, on purpose: (1) one model and one dynamics reward per run (from --dynamics-seed),
shared by all seeds, saved together in the run directory (dynamics.msgpack), reused with
--dynamics-path; (2) rollouts keep stepping after a terminal, masked (fixed shapes in lax.scan); (3)
model epochs drop their last partial minibatch; (4) the actor's learning rate decays by update
(cosine over --actor-lr-decay-steps, by default the run's first --total-steps: a resumed run that
extends --total-steps past it trains the critics and alpha only, and says so), not by epoch; (5)
evaluation every 10 epochs (checkpoints hold the 1M-row buffer); (6) hidden layers use PyTorch's
default kernel init with zero biases (no orthogonal init: no batched QR). MOREC-MOBILE is not
implemented. Presets (penalty lambda, filter mode) per (robot, level) from
generate_tmuxp_morec_mopo.py; other datasets take its base values (lambda 0.1, select). --no-filter
is plain MOPO on the same model (one random elite sample a step) at the same rollout length; it
still scores its transitions with r_D, for the comparison in the logs and records
(filter/rejected_transitions: the fraction that r_D would have rejected;
rollout/in_distribution_length: the steps before the first of them). --sweep penalty_coef=V1,V2 (or
discount, tau, target_entropy) trains a grid of agents with the seeds as one program
(common/members.py): the model and the dynamics reward are trained once per run and shared by every
member, so a sweep covers the agent only (each member's rollouts apply its own penalty).

    python algorithms/morec.py --dataset local/hopper/medium-v0 --num-seeds 3     # paper budget (GPU)
    python algorithms/morec.py --total-steps 50000 --model-max-epochs 30 --rollouts-per-epoch 500
    python algorithms/morec.py --dynamics-path runs/morec/<run>/dynamics.msgpack --no-filter
"""

from __future__ import annotations

import collections
import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import serialization

from common.data import Meta, UserError, load_dataset
from common.evaluation import default_eval_episodes, evaluate
from common.logging import RunLogger, atomic_write, cli, first_nonfinite
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
    total_steps: int = 3_000_000
    """agent updates (the paper's 3000 epochs x 1000)"""
    eval_every: int = 10_000
    """updates between evaluations (and checkpoints, which hold the model buffer)"""
    eval_episodes: int | None = None
    """evaluation episodes per seed (None: 10 on locomotion, 100 on mazes)"""
    batch_size: int = 256
    """transitions per update per seed, dataset and model rows together"""
    hidden_dims: tuple[int, ...] = (256, 256)
    """hidden sizes of the actor and of both critics"""
    # --- MOPO agent (SAC) ---
    penalty_coef: float | None = None
    """lambda of MOPO's penalty r - lambda max_e |sigma_e(s, a)| (None: the dataset's preset)"""
    discount: float = 0.99
    """discount gamma"""
    tau: float = 0.005
    """Polyak rate of the target critics"""
    actor_lr: float = 1e-4
    """actor learning rate, cosine-annealed to 0 over --actor-lr-decay-steps updates"""
    actor_lr_decay_steps: int | None = None
    """horizon of the actor's cosine schedule (None: --total-steps of the run's start; a resumed run keeps it)"""
    critic_lr: float = 3e-4
    """critic learning rate"""
    alpha_lr: float = 1e-4
    """entropy-temperature learning rate"""
    target_entropy: float | None = None
    """entropy target of the temperature (None: -action_dim)"""
    real_ratio: float = 0.05
    """int(real_ratio * batch_size) rows of each batch come from the dataset, the rest from rollouts"""
    # --- Filter ---
    filter: Literal["select", "softmax"] | None = None
    """select: the candidate of highest r_D; softmax: sample from softmax(r_D / temperature) (None: preset)"""
    no_filter: bool = False
    """plain MOPO: one random elite sample per step, no r_D termination (r_D is still logged)"""
    samples_per_elite: int = 2
    """Gaussian samples per elite: K = num_elites x samples_per_elite candidates per model step"""
    softmax_temperature: float = 0.1
    """temperature of the softmax filter"""
    terminal_dynamics_reward: float = 0.6
    """a chosen transition with r_D below this ends its rollout as a terminal"""
    state_clip: float = 25.0
    """candidates' next states and rewards are clipped to +-state_clip"""
    # --- Model rollouts ---
    rollout_length: int = 100
    """model steps per rollout"""
    rollouts_per_epoch: int = 2000
    """rollouts started from dataset states at the start of every epoch"""
    updates_per_epoch: int = 1000
    """agent updates per epoch (between two rounds of rollouts)"""
    retain_epochs: int = 5
    """the model buffer holds rollouts_per_epoch x rollout_length x retain_epochs transitions, FIFO"""
    # --- Dynamics model ---
    dynamics_path: str | None = None
    """a dynamics.msgpack (or the run directory holding it) of an earlier MOREC run: its model and dynamics reward"""
    dynamics_seed: int = 0
    """seed of the model's and the dynamics reward's training (one of each for every agent seed)"""
    num_models: int = 7
    """members of the dynamics ensemble"""
    num_elites: int = 5
    """members used in rollouts, the best by holdout MSE"""
    model_hidden_dims: tuple[int, ...] = (200, 200, 200, 200)
    """hidden sizes of every dynamics member (and of the generator)"""
    model_lr: float = 1e-3
    """dynamics learning rate (Adam)"""
    model_batch_size: int = 256
    """transitions per member per dynamics update"""
    holdout_ratio: float = 0.2
    """fraction of the dataset held out for early stopping and elites (at most --max-holdout rows)"""
    max_holdout: int = 1000
    """at most this many holdout rows (OfflineRL-Kit's min(20%, 1000))"""
    model_max_epochs: int = 2000
    """epochs of dynamics training at most (the official has none; lower it for CPU budgets)"""
    # --- Dynamics reward ---
    reward_hidden_dims: tuple[int, ...] = (256, 256)
    """hidden sizes of the discriminator"""
    reward_iterations: int = 400
    """adversarial iterations, one discriminator snapshot after each"""
    reward_steps_per_iteration: int = 50
    """discriminator and generator updates per iteration"""
    reward_batch_size: int = 256
    """dataset transitions (and as many generator samples) per adversarial update"""
    reward_lr: float = 3e-4
    """discriminator learning rate (Adam)"""
    generator_lr: float = 1e-4
    """generator learning rate (Adam)"""
    generator_nll_weight: float = 1.0
    """weight of the generator's Gaussian NLL on the data beside its adversarial loss"""
    max_retain_snapshots: int = 400
    """the last this many snapshots are kept (the official max_retain_num)"""
    snapshot_interval: int = 10
    """every this-th kept snapshot is in the r_D ensemble (the official ensemble_choosing_interval for MOPO)"""
    # --- Sweep ---
    sweep: tuple[str, ...] = ()
    """agent hyperparameter grid trained with the seeds as one program (one model and r_D for all), e.g.
    --sweep penalty_coef=0.5,1 tau=0.005,0.01"""


# (penalty lambda, filter) of MOREC-MOPO, per D4RL task: generate_tmuxp_morec_mopo.py's good_config.
DATASET_PRESETS = {
    ("halfcheetah", "random"): (0.5, "softmax"), ("halfcheetah", "medium"): (0.5, "select"),
    ("halfcheetah", "medium-replay"): (0.5, "softmax"), ("halfcheetah", "medium-expert"): (0.5, "select"),
    ("hopper", "random"): (10.0, "select"), ("hopper", "medium"): (15.0, "softmax"),
    ("hopper", "medium-replay"): (15.0, "softmax"), ("hopper", "medium-expert"): (15.0, "softmax"),
    ("walker2d", "random"): (1.0, "softmax"), ("walker2d", "medium"): (0.5, "softmax"),
    ("walker2d", "medium-replay"): (0.25, "select"), ("walker2d", "medium-expert"): (1.0, "softmax"),
}  # fmt: skip
DOMAIN_PRESET = (0.1, "select")  # the script's base penalty_coef and aligned reward_use_type, for any other dataset
LOG_STD_MIN, LOG_STD_MAX = -5.0, 2.0  # OfflineRL-Kit's TanhDiagGaussian sigma clamp
HIDDEN_DECAYS, HEAD_DECAY = (2.5e-5, 5e-5, 7.5e-5, 7.5e-5), 1e-4  # official per-layer L2; deeper layers reuse the last
DYNAMICS_FILE = "dynamics.msgpack"
MODEL_PROGRESS_FILE = "dynamics_training.msgpack"  # the model's training loop, while it trains
PAPER_STEPS = (3_000_000, 0)
SWEEPABLE = ("penalty_coef", "discount", "tau", "target_entropy")  # the traced agent hyperparameters (Hyper)


def resolve(args: Args, meta: Meta) -> Args:
    """Fill the None fields from the dataset's preset; an explicit flag always wins."""
    penalty, mode = DATASET_PRESETS.get((meta.robot, meta.level), DOMAIN_PRESET)
    preset = dict(
        penalty_coef=penalty,
        filter=mode,
        eval_episodes=default_eval_episodes(meta.domain),
        actor_lr_decay_steps=args.total_steps,
    )
    args = dataclasses.replace(args, **{k: v for k, v in preset.items() if getattr(args, k) is None})
    validate(args)
    return args


def validate(args: Args) -> None:
    """MOREC's own flags, checked before anything loads (common's cli checks the shared ones); the
    swept values too, each point's as if given alone."""
    for point in sweep_points(args.sweep, args, SWEEPABLE):
        check_flags(dataclasses.replace(args, **point))
    if args.dynamics_path and not args.resume and not dynamics_file(args.dynamics_path).is_file():
        raise UserError(f"--dynamics-path {args.dynamics_path}: no such file; give the {DYNAMICS_FILE} (or the "
                        "run directory) of an earlier MOREC run")  # fmt: skip


def check_flags(args: Args) -> None:
    checks = [
        (args.penalty_coef is None or args.penalty_coef >= 0, "--penalty-coef must be 0 or more"),
        (0 <= args.real_ratio <= 1, f"--real-ratio must be in [0, 1], got {args.real_ratio}"),
        (args.samples_per_elite >= 1, "--samples-per-elite must be at least 1"),
        (args.actor_lr_decay_steps is None or args.actor_lr_decay_steps >= 1, "--actor-lr-decay-steps must be >= 1"),
        (args.softmax_temperature > 0 and args.state_clip > 0, "--softmax-temperature, --state-clip must be > 0"),
        (min(args.rollout_length, args.rollouts_per_epoch, args.updates_per_epoch, args.retain_epochs) >= 1,
         "--rollout-length, --rollouts-per-epoch, --updates-per-epoch and --retain-epochs must be at least 1"),
        (1 <= args.num_elites <= args.num_models, "--num-elites must be between 1 and --num-models"),
        (0 < args.holdout_ratio < 1 and args.max_holdout >= 1, "--holdout-ratio must be in (0, 1), --max-holdout >= 1"),
        (args.model_max_epochs >= 1 and args.model_batch_size >= 1, "--model-max-epochs and --model-batch-size >= 1"),
        (min(args.reward_iterations, args.reward_steps_per_iteration, args.reward_batch_size, args.max_retain_snapshots,
             args.snapshot_interval) >= 1, "the --reward-* and snapshot flags must be at least 1"),
        (min(args.actor_lr, args.critic_lr, args.alpha_lr, args.model_lr, args.reward_lr, args.generator_lr) > 0,
         "learning rates must be positive"),
        (0.0 <= args.discount < 1.0, f"--discount must be in [0, 1), got {args.discount}"),
        (0.0 < args.tau <= 1.0, f"--tau must be in (0, 1], got {args.tau}"),
    ]  # fmt: skip
    for ok, message in checks:
        if not ok:
            raise UserError(message)


def dynamics_file(path: str) -> Path:
    path = Path(path)
    return path / DYNAMICS_FILE if path.is_dir() else path


def snapshot_indices(args: Args) -> np.ndarray:
    """The snapshots in the r_D ensemble: the last max_retain, every interval-th (from the oldest kept)."""
    return np.arange(args.reward_iterations)[-args.max_retain_snapshots :][:: args.snapshot_interval]


# --- Termination of model rollouts (the robots' rules on the next observation) ----------------------
def hopper_done(obs):
    healthy = jnp.isfinite(obs).all(-1) & (jnp.abs(obs[..., 1:]) < 100).all(-1)
    return ~(healthy & (obs[..., 0] > 0.7) & (jnp.abs(obs[..., 1]) < 0.2))


def walker2d_done(obs):
    return ~((obs[..., 0] > 0.8) & (obs[..., 0] < 2.0) & (obs[..., 1] > -1.0) & (obs[..., 1] < 1.0))


def ant_done(obs):
    return ~(jnp.isfinite(obs).all(-1) & (obs[..., 0] >= 0.2) & (obs[..., 0] <= 1.0))


def inverted_pendulum_done(obs):
    return ~jnp.isfinite(obs).all(-1) | (jnp.abs(obs[..., 1]) > 0.2)


def never_done(obs):
    return jnp.zeros(obs.shape[:-1], bool)


TERMINATION = {"hopper": hopper_done, "walker2d": walker2d_done, "ant": ant_done,
               "invertedpendulum": inverted_pendulum_done, "halfcheetah": never_done}  # fmt: skip


def termination_of(meta: Meta):
    env = meta.env_spec.id.split("-")[0].lower()
    return TERMINATION.get(env, never_done), env if env in TERMINATION else f"never ({meta.env_spec.id})"


# The model's random stream, apart from the agents' (jax.random.key(seed)): with --seed equal to
# --dynamics-seed, seed 0's agent would otherwise draw the keys of the model's holdout split.
MODEL_STREAM = 0x6D6F64  # "mod"

# --- Networks -------------------------------------------------------------------------------------
TORCH_LINEAR = nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform")  # PyTorch's nn.Linear weights


def trunc_normal_init(key, shape, dtype=jnp.float32):
    """OfflineRL-Kit's dynamics init, torch's trunc_normal_(std=1 / (2 sqrt(fan_in))): its bounds are
    the default absolute +-2 (15 standard deviations for hopper's 14 inputs, 57 for a 200-wide layer),
    so it is all but a plain normal (RAVL's official init truncates at 2 standard deviations)."""
    std = 1.0 / (2.0 * np.sqrt(shape[0]))
    return jax.random.truncated_normal(key, -2.0 / std, 2.0 / std, shape, dtype) * std


class MLP(nn.Module):
    hidden_dims: tuple[int, ...]
    out_dim: int

    @nn.compact
    def __call__(self, x):
        for d in self.hidden_dims:
            x = nn.relu(nn.Dense(d, kernel_init=TORCH_LINEAR)(x))
        return nn.Dense(self.out_dim, kernel_init=TORCH_LINEAR)(x)


class Actor(nn.Module):
    """Tanh-Gaussian policy: mean and clipped log-std heads on one trunk."""

    hidden_dims: tuple[int, ...]
    action_dim: int

    @nn.compact
    def __call__(self, obs):
        out = MLP(self.hidden_dims, 2 * self.action_dim)(obs)
        mean, log_std = jnp.split(out, 2, -1)
        return mean, jnp.clip(log_std, LOG_STD_MIN, LOG_STD_MAX)


class Critic(nn.Module):
    hidden_dims: tuple[int, ...]

    @nn.compact
    def __call__(self, obs, action):
        return MLP(self.hidden_dims, 1)(jnp.concatenate([obs, action], -1))[..., 0]


class DynamicsMember(nn.Module):
    """One probabilistic MLP: standardized (s, a) -> mean and log-variance of (s' - s, r)."""

    hidden_dims: tuple[int, ...]
    out_dim: int

    @nn.compact
    def __call__(self, x, max_logvar, min_logvar):
        for i, d in enumerate(self.hidden_dims):
            x = nn.silu(nn.Dense(d, kernel_init=trunc_normal_init, name=f"hidden_{i}")(x))
        mean = nn.Dense(self.out_dim, kernel_init=trunc_normal_init, name="mean")(x)
        logvar = nn.Dense(self.out_dim, kernel_init=trunc_normal_init, name="logvar")(x)
        logvar = max_logvar - jax.nn.softplus(max_logvar - logvar)  # PETS' soft bounds
        return mean, min_logvar + jax.nn.softplus(logvar - min_logvar)


class Dynamics(NamedTuple):
    members: dict  # every member's parameters, stacked (num_models, ...)
    max_logvar: jax.Array  # (obs_dim + 1,)
    min_logvar: jax.Array
    input_mean: jax.Array  # (obs_dim + action_dim,)
    input_std: jax.Array
    elites: jax.Array  # (num_elites,) int32, lowest holdout MSE first


class RewardModel(NamedTuple):
    """The dynamics reward: discriminator snapshots and their normalization (saved with the model)."""

    snapshots: dict  # discriminator parameters, stacked (num_snapshots, ...)
    learner_value: jax.Array  # (num_snapshots,) mean logit on generator samples of the probe set
    expert_value: jax.Array  # (num_snapshots,) mean logit on the probe set's dataset transitions
    obs_mean: jax.Array
    obs_std: jax.Array
    action_mean: jax.Array
    action_std: jax.Array


class Transitions(NamedTuple):
    observations: jax.Array
    actions: jax.Array
    rewards: jax.Array
    next_observations: jax.Array
    masks: jax.Array  # 1 - terminal


class ModelBuffer(NamedTuple):
    data: Transitions
    ptr: jax.Array
    size: jax.Array


class TrainState(NamedTuple):
    actor: dict
    critic: dict  # 2 critics' parameters, stacked
    target_critic: dict
    log_alpha: jax.Array
    actor_opt: optax.OptState
    critic_opt: optax.OptState
    alpha_opt: optax.OptState


class Hyper(NamedTuple):
    """Numeric agent hyperparameters that do not change shapes, as float32 arrays (one per member)."""

    discount: jax.Array
    tau: jax.Array
    target_entropy: jax.Array
    penalty_coef: jax.Array  # MOPO's lambda, used by the rollouts (not by `update`)


# --- The dynamics model ---------------------------------------------------------------------------
def ensemble_apply(member, members, max_logvar, min_logvar, x, x_axis=None):
    """Every member on x (B, in), or member i on x[i] with x_axis=0: means, logvars (M, B, out)."""
    return jax.vmap(lambda p, xi: member.apply(p, xi, max_logvar, min_logvar), in_axes=(0, x_axis))(members, x)


def dynamics_loss(trainable, member, x, y, num_hidden: int):
    """Gaussian NLL per member on its own batch, summed over members, + L2 + 0.01 (sum max_lv - sum min_lv)."""
    mean, logvar = ensemble_apply(member, trainable["members"], trainable["max_logvar"], trainable["min_logvar"], x, 0)
    nll = (logvar + (y - mean) ** 2 * jnp.exp(-logvar)).mean((1, 2))
    p = trainable["members"]["params"]
    decays = [(f"hidden_{i}", HIDDEN_DECAYS[min(i, len(HIDDEN_DECAYS) - 1)]) for i in range(num_hidden)]
    l2 = 0.5 * sum(d * (p[n]["kernel"] ** 2).sum() for n, d in decays + [("mean", HEAD_DECAY), ("logvar", HEAD_DECAY)])
    bound = 0.01 * (trainable["max_logvar"].sum() - trainable["min_logvar"].sum())
    return nll.sum() + l2 + bound, nll.mean()


def standardize_inputs(obs, actions, mean, std):
    """OfflineRL-Kit's StandardScaler.transform (no clip: rollouts far from the data reach the model as they are)."""
    return (jnp.concatenate([obs, actions], -1) - mean) / std


def member_batches(boot, key, batch: int):
    """One epoch's minibatches, (num_batches, M, batch) row indices: member m draws only from its own
    bootstrap set boot[m], drawn once (OfflineRL-Kit shuffles each set between epochs, never swaps them)."""
    num_batches = boot.shape[1] // batch
    rows = jax.random.permutation(key, boot.shape[1])[: num_batches * batch].reshape(num_batches, batch)
    return boot[:, rows].transpose(1, 0, 2)


def train_dynamics(
    args: Args, data: Transitions, key, log=print, progress: Path | None = None
) -> tuple[Dynamics, dict]:
    """OfflineRL-Kit's training: a host loop over jitted epochs, stopped after 5 epochs without a 1% gain.
    With `progress`, the loop's state is written there after every epoch and a file already there is
    continued from: a run killed while its model trains resumes at its last epoch, with the model an
    uninterrupted training gives."""
    t0 = time.time()
    obs, next_obs = np.asarray(data.observations), np.asarray(data.next_observations)
    x = np.concatenate([obs, np.asarray(data.actions)], -1)
    y = jnp.asarray(np.concatenate([next_obs - obs, np.asarray(data.rewards)[:, None]], -1), jnp.float32)
    k_split, k_boot, k_init, key = jax.random.split(key, 4)
    n, m = len(x), args.num_models
    perm = jax.random.permutation(k_split, n)
    n_hold = max(1, min(int(n * args.holdout_ratio), args.max_holdout))
    x_fit = x[np.asarray(perm[n_hold:])]  # the scaler is fitted on the training split, as OfflineRL-Kit's
    mean, std = x_fit.mean(0), x_fit.std(0)
    std = np.where(std < 1e-12, 1.0, std)
    xn = jnp.asarray((x - mean) / std, jnp.float32)
    x_hold, y_hold, x_train, y_train = xn[perm[:n_hold]], y[perm[:n_hold]], xn[perm[n_hold:]], y[perm[n_hold:]]
    boot = jax.random.randint(k_boot, (m, n - n_hold), 0, n - n_hold)
    member, num_hidden = DynamicsMember(args.model_hidden_dims, y.shape[1]), len(args.model_hidden_dims)
    max_lv, min_lv = jnp.full(y.shape[1], 0.5, jnp.float32), jnp.full(y.shape[1], -10.0, jnp.float32)
    members = jax.jit(jax.vmap(member.init, in_axes=(0, None, None, None)))(jax.random.split(k_init, m), xn[:1],
                                                                            max_lv, min_lv)  # fmt: skip
    trainable = {"members": members, "max_logvar": max_lv, "min_logvar": min_lv}
    tx = optax.adam(args.model_lr)
    opt_state, batch = tx.init(trainable), min(args.model_batch_size, n - n_hold)

    @jax.jit
    def epoch(trainable, opt_state, key):
        idx = member_batches(boot, key, batch)

        def body(carry, idx_b):
            trainable, opt_state = carry
            (_, nll), grads = jax.value_and_grad(dynamics_loss, has_aux=True)(
                trainable, member, x_train[idx_b], y_train[idx_b], num_hidden
            )
            updates, opt_state = tx.update(grads, opt_state, trainable)
            return (optax.apply_updates(trainable, updates), opt_state), nll

        (trainable, opt_state), nll = jax.lax.scan(body, (trainable, opt_state), idx)
        return trainable, opt_state, nll.mean()

    @jax.jit
    def holdout_mse(members):
        mean, _ = ensemble_apply(member, members, max_lv, min_lv, x_hold)  # bounds do not move the mean
        return ((y_hold - mean) ** 2).mean((1, 2))

    best_mse, best_members, stale, stop, done = np.full(m, np.inf), members, 0, "max_epochs", 0
    if progress is not None and progress.exists():
        try:
            raw = serialization.msgpack_restore(progress.read_bytes())
            done, stale, key = int(raw["epochs"]), int(raw["stale"]), jax.random.wrap_key_data(raw["key"])
            trainable = serialization.from_state_dict(trainable, raw["trainable"])
            opt_state = serialization.from_state_dict(opt_state, raw["opt_state"])
            best_members = serialization.from_state_dict(best_members, raw["best_members"])
            best_mse, t0 = np.asarray(raw["best_mse"]), t0 - float(raw["seconds"])
        except Exception as e:
            raise UserError(f"{progress}: not this run's model training ({type(e).__name__}); delete it to train "
                            "the model from its start") from None  # fmt: skip
        log(f"dynamics: continuing from epoch {done} ({progress.name})", flush=True)
    logged = time.time()
    for i in range(done, args.model_max_epochs):
        key, k_epoch = jax.random.split(key)
        trainable, opt_state, nll = epoch(trainable, opt_state, k_epoch)
        mse, done = np.asarray(holdout_mse(trainable["members"])), i + 1
        improved = mse < 0.99 * best_mse  # the official (best - mse) / best > 1%
        best_mse = np.where(improved, mse, best_mse)
        pick = lambda b, c, imp=improved: jnp.where(imp.reshape(-1, *[1] * (c.ndim - 1)), c, b)  # noqa: E731
        best_members = jax.tree_util.tree_map(pick, best_members, trainable["members"])
        stale = 0 if improved.any() else stale + 1
        if i % 25 == 0 or time.time() - logged >= 60:  # a line a minute at least: epochs can take a minute
            logged = time.time()
            log(f"dynamics epoch {i + 1}: train NLL {float(nll):.4f}, holdout MSE {[round(float(v), 5) for v in mse]} "
                f"({time.time() - t0:.0f} s)", flush=True)  # fmt: skip
        if stale >= 5:
            stop = "early"
            break
        if progress is not None:
            loop = dict(epochs=done, stale=stale, key=jax.random.key_data(key), trainable=trainable,
                        opt_state=opt_state, best_mse=best_mse, best_members=best_members,
                        seconds=time.time() - t0)  # fmt: skip
            atomic_write(progress, serialization.msgpack_serialize(serialization.to_state_dict(jax.device_get(loop))))
    elites = np.argsort(best_mse, kind="stable")[: args.num_elites]
    dynamics = Dynamics(best_members, trainable["max_logvar"], trainable["min_logvar"], jnp.float32(mean),
                        jnp.float32(std), jnp.asarray(elites, jnp.int32))  # fmt: skip
    info = dict(epochs=done, stopped=stop, holdout_mse=np.round(best_mse, 6).tolist(), elites=elites.tolist(),
                holdout_rows=n_hold, train_seconds=round(time.time() - t0, 1))  # fmt: skip
    log(f"dynamics: {done} epochs ({stop}), elites {elites.tolist()}, holdout MSE "
        f"{np.round(best_mse[elites], 5).tolist()}", flush=True)  # fmt: skip
    return dynamics, info


# --- The dynamics reward --------------------------------------------------------------------------
def reward_features(rm: RewardModel, obs, actions, next_obs):
    """Discriminator input: standardized s and a, and s'_norm - s_norm (the official delta_input)."""
    s, s2 = (obs - rm.obs_mean) / rm.obs_std, (next_obs - rm.obs_mean) / rm.obs_std
    return jnp.concatenate([s, (actions - rm.action_mean) / rm.action_std, s2 - s], -1)


def dynamics_reward(disc, rm: RewardModel, obs, actions, next_obs, d_clip: float = 1.0):
    """r_D = -log(1 - mean_i clip(sigmoid(l_i), 0, d_clip) + 1e-9) over the snapshots i, each logit
    clipped to [learner_i, expert_i] and mapped to [-1, 1]. Inputs share their leading axes."""
    x = reward_features(rm, obs, actions, next_obs)
    logits = jax.vmap(lambda p: disc.apply(p, x)[..., 0])(rm.snapshots)  # (num_snapshots, ...)
    shape = (-1,) + (1,) * (logits.ndim - 1)
    lo, hi = rm.learner_value.reshape(shape), rm.expert_value.reshape(shape)
    logits = (jnp.clip(logits, lo, hi) - lo) / (hi - lo + 1e-7) * 2.0 - 1.0
    return -jnp.log(1.0 - jnp.clip(jax.nn.sigmoid(logits), 0.0, d_clip).mean(0) + 1e-9)


def discriminator_loss(d_params, disc, real_x, fake_x):
    """Logistic loss: dataset transitions are 1 ("expert"), generator samples 0 ("learner")."""
    real, fake = disc.apply(d_params, real_x)[..., 0], disc.apply(d_params, fake_x)[..., 0]
    loss = -(jax.nn.log_sigmoid(real).mean() + jax.nn.log_sigmoid(-fake).mean())
    accuracy = 0.5 * ((real > 0).mean() + (fake < 0).mean())
    return loss, {"disc_loss": loss, "disc_accuracy": accuracy, "logit_real": real.mean(), "logit_fake": fake.mean()}


def generator_loss(g_params, d_params, gen, disc, rm, gen_bounds, batch: Transitions, x_in, target, nll_weight, key):
    """The generator (a Gaussian dynamics network) makes D call its reparameterized samples real, and
    keeps its Gaussian NLL on the data."""
    mean, logvar = gen.apply(g_params, x_in, *gen_bounds)
    sample = mean + jnp.exp(0.5 * logvar) * jax.random.normal(key, mean.shape)
    fake_next = batch.observations + sample[:, :-1]
    logit = disc.apply(d_params, reward_features(rm, batch.observations, batch.actions, fake_next))[..., 0]
    adversarial = -jax.nn.log_sigmoid(logit).mean()
    nll = (logvar + (target - mean) ** 2 * jnp.exp(-logvar)).mean()
    return adversarial + nll_weight * nll, ({"gen_adversarial": adversarial, "gen_nll": nll}, fake_next)


def train_dynamics_reward(args: Args, data: Transitions, dynamics: Dynamics, key, log=print):
    """Adversarial learning of r_D (one jitted scan over iterations of scanned updates): -> (RewardModel, info)."""
    t0 = time.time()
    obs, actions = np.asarray(data.observations), np.asarray(data.actions)
    std = lambda a: jnp.float32(np.where(a.std(0) < 1e-6, 1.0, a.std(0)))  # noqa: E731
    stats = dict(obs_mean=jnp.float32(obs.mean(0)), obs_std=std(obs), action_mean=jnp.float32(actions.mean(0)),
                 action_std=std(actions))  # fmt: skip
    obs_dim, n = obs.shape[1], obs.shape[0]
    disc = MLP(args.reward_hidden_dims, 1)
    gen = DynamicsMember(args.model_hidden_dims, obs_dim + 1)
    bounds = (dynamics.max_logvar, dynamics.min_logvar)
    k_init, k_probe, k_train = jax.random.split(key, 3)
    d_params = jax.jit(disc.init)(k_init, jnp.zeros((1, 2 * obs_dim + actions.shape[1])))
    g_params = jax.jit(gen.init)(jax.random.fold_in(k_init, 1), jnp.zeros((1, obs_dim + actions.shape[1])), *bounds)
    d_tx, g_tx = optax.adam(args.reward_lr), optax.adam(args.generator_lr)
    probe = jax.random.permutation(k_probe, n)[: min(n, 2048)]
    rm0 = RewardModel(None, None, None, **stats)

    def rows(idx):
        batch = jax.tree_util.tree_map(lambda a: a[idx], data)
        x_in = standardize_inputs(batch.observations, batch.actions, dynamics.input_mean, dynamics.input_std)
        target = jnp.concatenate([batch.next_observations - batch.observations, batch.rewards[:, None]], -1)
        return batch, x_in, target

    def update(carry, key):
        d_params, d_opt, g_params, g_opt = carry
        k_idx, k_gen = jax.random.split(key)
        batch, x_in, target = rows(jax.random.randint(k_idx, (args.reward_batch_size,), 0, n))
        (_, (m_gen, fake_next)), g_grads = jax.value_and_grad(generator_loss, has_aux=True)(
            g_params, d_params, gen, disc, rm0, bounds, batch, x_in, target, args.generator_nll_weight, k_gen
        )
        real_x = reward_features(rm0, batch.observations, batch.actions, batch.next_observations)
        fake_x = reward_features(rm0, batch.observations, batch.actions, jax.lax.stop_gradient(fake_next))
        (_, m_disc), d_grads = jax.value_and_grad(discriminator_loss, has_aux=True)(d_params, disc, real_x, fake_x)
        updates, d_opt = d_tx.update(d_grads, d_opt, d_params)
        d_params = optax.apply_updates(d_params, updates)
        updates, g_opt = g_tx.update(g_grads, g_opt, g_params)
        return (d_params, d_opt, optax.apply_updates(g_params, updates), g_opt), {**m_disc, **m_gen}

    def iteration(carry, key):
        k_steps, k_probe = jax.random.split(key)
        carry, metrics = jax.lax.scan(update, carry, jax.random.split(k_steps, args.reward_steps_per_iteration))
        d_params, g_params = carry[0], carry[2]
        batch, x_in, _ = rows(probe)
        mean, logvar = gen.apply(g_params, x_in, *bounds)
        fake_next = batch.observations + (mean + jnp.exp(0.5 * logvar) * jax.random.normal(k_probe, mean.shape))[:, :-1]
        expert = disc.apply(d_params, reward_features(rm0, batch.observations, batch.actions,
                                                      batch.next_observations))[..., 0].mean()  # fmt: skip
        learner = disc.apply(d_params, reward_features(rm0, batch.observations, batch.actions, fake_next))[
            ..., 0
        ].mean()
        return carry, (d_params, learner, expert, jax.tree_util.tree_map(jnp.mean, metrics))

    @jax.jit
    def run(d_params, g_params, key):
        carry = (d_params, d_tx.init(d_params), g_params, g_tx.init(g_params))
        _, out = jax.lax.scan(iteration, carry, jax.random.split(key, args.reward_iterations))
        return out

    snapshots, learner, expert, metrics = run(d_params, g_params, k_train)
    keep = jnp.asarray(snapshot_indices(args))
    rm = RewardModel(jax.tree_util.tree_map(lambda p: p[keep], snapshots), learner[keep], expert[keep], **stats)
    metrics = {k: float(np.asarray(v)[-1]) for k, v in metrics.items()}
    check = reward_check(args, disc, gen, rm, dynamics, jax.tree_util.tree_map(lambda a: a[probe], data), k_probe)
    info = dict(snapshots=len(keep), train_seconds=round(time.time() - t0, 1),
                final={k: round(v, 4) for k, v in metrics.items()}, check=check)  # fmt: skip
    log(f"dynamics reward: {args.reward_iterations} iterations, {len(keep)} snapshots in the ensemble, last "
        f"discriminator accuracy {metrics['disc_accuracy']:.3f} ({info['train_seconds']} s); r_D below "
        f"{args.terminal_dynamics_reward} on {check['dataset_below']:.3f} of dataset transitions and "
        f"{check['model_below']:.3f} of model samples, AUC against perturbed next states {check['auc_perturbed']:.3f}",
        flush=True)  # fmt: skip
    return rm, info


def auc(pos, neg) -> float:
    """P(a positive scores above a negative), ties counting half (the Mann-Whitney statistic)."""
    pos, neg = np.asarray(pos, np.float64).ravel(), np.asarray(neg, np.float64).ravel()
    return float((pos[:, None] > neg[None]).mean() + 0.5 * (pos[:, None] == neg[None]).mean())


def reward_check(args: Args, disc, member, rm: RewardModel, dynamics: Dynamics, batch: Transitions, key) -> dict:
    """Is r_D a usable filter? On dataset transitions: the fraction below the threshold (should be
    small), the same for one sample of a random elite (a good model: small too), and the AUC of the
    dataset's transitions against the same with s' perturbed by 0.2 std of s' - s (should be well above 0.5)."""
    k_elite, k_noise, k_pert = jax.random.split(key, 3)
    score = lambda s2: np.asarray(dynamics_reward(disc, rm, batch.observations, batch.actions, s2))  # noqa: E731
    x = standardize_inputs(batch.observations, batch.actions, dynamics.input_mean, dynamics.input_std)
    mean, logvar = ensemble_apply(member, dynamics.members, dynamics.max_logvar, dynamics.min_logvar, x)
    rows = jnp.arange(x.shape[0])
    pick = dynamics.elites[jax.random.randint(k_elite, rows.shape, 0, dynamics.elites.shape[0])]
    sample = mean[pick, rows] + jnp.exp(0.5 * logvar[pick, rows]) * jax.random.normal(k_noise, mean.shape[1:])
    delta = batch.next_observations - batch.observations
    perturbed = batch.next_observations + 0.2 * delta.std(0) * jax.random.normal(k_pert, delta.shape)
    real = score(batch.next_observations)
    threshold = args.terminal_dynamics_reward
    return {"dataset_below": round(float((real < threshold).mean()), 4),
            "model_below": round(float((score(batch.observations + sample[:, :-1]) < threshold).mean()), 4),
            "auc_perturbed": round(auc(real, score(perturbed)), 4)}  # fmt: skip


def model_template(args: Args, obs_dim: int, action_dim: int) -> tuple[Dynamics, RewardModel]:
    """An untrained model and dynamics reward of this run's shapes (what a loaded file must match)."""
    member = DynamicsMember(args.model_hidden_dims, obs_dim + 1)
    x, lv = jnp.zeros((1, obs_dim + action_dim)), jnp.zeros(obs_dim + 1)
    zeros = lambda tree: jax.tree_util.tree_map(lambda s: np.zeros(s.shape, s.dtype), tree)  # noqa: E731
    members = zeros(jax.eval_shape(jax.vmap(member.init, in_axes=(0, None, None, None)),
                                   jax.random.split(jax.random.key(0), args.num_models), x, lv, lv))  # fmt: skip
    z = np.zeros(obs_dim + action_dim, np.float32)
    dynamics = Dynamics(members, lv, lv, z, z, np.zeros(args.num_elites, np.int32))
    k = len(snapshot_indices(args))
    disc = MLP(args.reward_hidden_dims, 1)
    snaps = zeros(jax.eval_shape(jax.vmap(disc.init, in_axes=(0, None)), jax.random.split(jax.random.key(0), k),
                                 jnp.zeros((1, 2 * obs_dim + action_dim))))  # fmt: skip
    o, a = np.zeros(obs_dim, np.float32), np.zeros(action_dim, np.float32)
    return dynamics, RewardModel(snaps, np.zeros(k, np.float32), np.zeros(k, np.float32), o, o, a, a)


def save_model(path: Path, dynamics: Dynamics, rm: RewardModel, info: dict) -> None:
    payload = {"dynamics": serialization.to_state_dict(jax.device_get(dynamics)),
               "reward": serialization.to_state_dict(jax.device_get(rm)), "info": json.dumps(info)}  # fmt: skip
    atomic_write(path, serialization.msgpack_serialize(payload))


def load_model(path: Path, template: tuple, flag: str) -> tuple[Dynamics, RewardModel, dict]:
    """A saved model and dynamics reward shaped like `template`, or one clear error naming the file."""
    try:
        raw = serialization.msgpack_restore(path.read_bytes())
        info = json.loads(raw["info"])
        loaded = (serialization.from_state_dict(template[0], raw["dynamics"]),
                  serialization.from_state_dict(template[1], raw["reward"]))  # fmt: skip
        fits = jax.tree_util.tree_map(lambda a, b: np.shape(a) == np.shape(b), template, loaded)
    except Exception as e:
        raise UserError(f"{flag} {path}: not a MOREC dynamics model ({type(e).__name__}); give the {DYNAMICS_FILE} "
                        "an earlier MOREC run wrote in its run directory") from None  # fmt: skip
    if not all(jax.tree_util.tree_leaves(fits)):
        raise UserError(
            f"{flag} {path}: its model or dynamics reward does not fit this run; give the run's "
            "--num-models, --num-elites, --model-hidden-dims, --reward-hidden-dims and snapshot flags"
        )
    to_device = lambda x: type(x)(*(jax.tree_util.tree_map(jnp.asarray, f) for f in x))  # noqa: E731
    return to_device(loaded[0]), to_device(loaded[1]), info


# --- The filter, model steps and rollouts ---------------------------------------------------------
def choose_candidate(r_d, key, mode: str, temperature: float = 0.1):
    """Index of the kept candidate per row, r_d (K, n): argmax (select) or a sample of softmax(r_d / T)."""
    if mode == "softmax":
        return jax.random.categorical(key, r_d / temperature, axis=0)
    return jnp.argmax(r_d, 0)


def mopo_penalty(logvar):
    """MOPO's "aleatoric" uncertainty: max over ALL members of the L2 norm of the std of (s', r).
    logvar (M, n, obs_dim + 1) -> (n,)."""
    return jnp.sqrt(jnp.exp(logvar).sum(-1)).max(0)


def model_step(member, dyn: Dynamics, obs, actions, key, done_fn, reward_fn, mode: str, cfg: Args, penalty_coef):
    """One filtered (or, mode "none", plain MOPO) model step -> (s', penalized r, done, info per row).
    reward_fn(obs, actions, next_obs) -> r_D over shared leading axes."""
    x = standardize_inputs(obs, actions, dyn.input_mean, dyn.input_std)
    mean, logvar = ensemble_apply(member, dyn.members, dyn.max_logvar, dyn.min_logvar, x)  # (M, n, obs_dim + 1)
    penalty = mopo_penalty(logvar)
    k_noise, k_pick = jax.random.split(key)
    em, es = mean[dyn.elites], jnp.exp(0.5 * logvar[dyn.elites])
    cand = em + es * jax.random.normal(k_noise, (cfg.samples_per_elite, *em.shape))
    cand = cand.reshape(-1, *em.shape[1:])  # (K, n, obs_dim + 1): sample j of every elite, then j + 1
    cand = jnp.clip(cand.at[..., :-1].add(obs), -cfg.state_clip, cfg.state_clip)
    rows = jnp.arange(obs.shape[0])
    if mode == "none":
        pick = jax.random.randint(k_pick, obs.shape[:1], 0, em.shape[0])
        chosen = cand[pick, rows]
        r_chosen = reward_fn(obs, actions, chosen[:, :-1])
        candidates_below = (r_chosen < cfg.terminal_dynamics_reward).astype(jnp.float32)
    else:
        r_d = reward_fn(jnp.broadcast_to(obs, cand[..., :-1].shape),
                        jnp.broadcast_to(actions, (*cand.shape[:2], actions.shape[-1])), cand[..., :-1])  # fmt: skip
        pick = choose_candidate(r_d, k_pick, mode, cfg.softmax_temperature)
        chosen, r_chosen = cand[pick, rows], r_d[pick, rows]
        candidates_below = (r_d < cfg.terminal_dynamics_reward).mean(0)
    next_obs, below = chosen[:, :-1], r_chosen < cfg.terminal_dynamics_reward
    done = done_fn(next_obs) | (below if mode != "none" else False)
    info = dict(candidates_below=candidates_below, below=below.astype(jnp.float32), r_d=r_chosen, penalty=penalty)
    return next_obs, chosen[:, -1] - penalty_coef * penalty, done, info


def generate_rollouts(policy, step, start_obs, key, k: int):
    """k steps from start_obs (n, d): transitions (k, n, ...), valid (k, n) (false after a rollout's
    terminal step: the rollout keeps stepping, masked) and the step's info (k, n)."""

    def body(carry, key):
        obs, alive = carry
        k_action, k_step = jax.random.split(key)
        actions = policy(obs, k_action)
        next_obs, rewards, done, info = step(obs, actions, k_step)
        out = Transitions(obs, actions, rewards, next_obs, 1.0 - done.astype(jnp.float32))
        return (next_obs, alive & ~done), (out, alive, info)

    _, out = jax.lax.scan(body, (start_obs, jnp.ones(start_obs.shape[:1], bool)), jax.random.split(key, k))
    return out


def rollout_stats(transitions: Transitions, valid, info) -> dict:
    """Means over the rollouts' valid transitions: how much the filter rejects, how long rollouts last,
    and how many steps they stay in distribution (r_D at or above the threshold) before their first
    transition below it: MOREC ends a rollout there, plain MOPO goes on, so the two compare on this."""
    count = jnp.maximum(valid.sum(), 1)
    mean = lambda x: (x * valid).sum() / count  # noqa: E731
    in_distribution = jnp.cumprod(valid * (1.0 - info["below"]), axis=0).sum(0).mean()
    return {"rollout/mean_length": valid.sum(0).mean(), "rollout/in_distribution_length": in_distribution,
            "rollout/mean_reward": mean(transitions.rewards),
            "rollout/terminal_fraction": mean(1.0 - transitions.masks), "rollout/penalty": mean(info["penalty"]),
            "filter/rejected_candidates": mean(info["candidates_below"]),
            "filter/rejected_transitions": mean(info["below"]),
            "filter/dynamics_reward": mean(info["r_d"])}  # fmt: skip


def empty_buffer(capacity: int, obs_dim: int, action_dim: int) -> ModelBuffer:
    shapes = [(obs_dim,), (action_dim,), (), (obs_dim,), ()]
    data = Transitions(*(jnp.zeros((capacity, *s), jnp.float32) for s in shapes))
    return ModelBuffer(data, jnp.zeros((), jnp.int32), jnp.zeros((), jnp.int32))


def buffer_add(buffer: ModelBuffer, transitions: Transitions, valid) -> ModelBuffer:
    """Append the valid rows in step order, FIFO (valid.size <= capacity by construction)."""
    lead, valid = valid.ndim, valid.reshape(-1)
    flat = jax.tree_util.tree_map(lambda x: x.reshape(valid.shape[0], *x.shape[lead:]), transitions)
    order = jnp.argsort(jnp.where(valid, 0, 1), stable=True)
    count = valid.sum().astype(jnp.int32)
    capacity, i = buffer.data.rewards.shape[0], jnp.arange(valid.shape[0])
    slots = jnp.where(i < count, (buffer.ptr + i) % capacity, capacity)  # out of range: dropped
    data = jax.tree_util.tree_map(lambda b, x: b.at[slots].set(x[order], mode="drop"), buffer.data, flat)
    return ModelBuffer(data, (buffer.ptr + count) % capacity, jnp.minimum(buffer.size + count, capacity))


def sample_mixed(data: Transitions, buffer: ModelBuffer, key, n_real: int, n_model: int) -> Transitions:
    k_real, k_model = jax.random.split(key)
    real = jax.random.randint(k_real, (n_real,), 0, data.rewards.shape[0])
    model = jax.random.randint(k_model, (n_model,), 0, jnp.maximum(buffer.size, 1))
    return jax.tree_util.tree_map(lambda d, b: jnp.concatenate([d[real], b[model]]), data, buffer.data)


# --- The agent (OfflineRL-Kit's SAC) ----------------------------------------------------------------
def tanh_gaussian_log_prob(mean, log_std, u):
    gauss = -0.5 * ((u - mean) / jnp.exp(log_std)) ** 2 - log_std - 0.5 * jnp.log(2 * jnp.pi)
    return gauss.sum(-1) - jnp.log(1.0 - jnp.tanh(u) ** 2 + 1e-6).sum(-1)


def make_agent(args: Args, obs_dim: int, action_dim: int):
    """init, update, act and sample_action for one seed, and the losses (for tests)."""
    actor, critic = Actor(args.hidden_dims, action_dim), Critic(args.hidden_dims)
    actor_tx = optax.adam(
        optax.cosine_decay_schedule(args.actor_lr, max(args.actor_lr_decay_steps or args.total_steps, 1))
    )
    critic_tx, alpha_tx = optax.adam(args.critic_lr), optax.adam(args.alpha_lr)

    def q_all(params, obs, actions):  # (2, B)
        return jax.vmap(critic.apply, in_axes=(0, None, None))(params, obs, actions)

    def init(key) -> TrainState:
        k_actor, k_critic = jax.random.split(key)
        obs, act = jnp.zeros((1, obs_dim)), jnp.zeros((1, action_dim))
        actor_params = actor.init(k_actor, obs)
        critic_params = jax.vmap(critic.init, in_axes=(0, None, None))(jax.random.split(k_critic, 2), obs, act)
        log_alpha = jnp.zeros(())
        target = jax.tree_util.tree_map(jnp.copy, critic_params)  # own buffers: the state is donated
        opts = actor_tx.init(actor_params), critic_tx.init(critic_params), alpha_tx.init(log_alpha)
        return TrainState(actor_params, critic_params, target, log_alpha, *opts)

    def sample_action(actor_params, obs, key):
        mean, log_std = actor.apply(actor_params, obs)
        u = mean + jnp.exp(log_std) * jax.random.normal(key, mean.shape)
        return jnp.tanh(u), tanh_gaussian_log_prob(mean, log_std, u)

    def critic_loss(critic_params, batch: Transitions, target_q):
        q = q_all(critic_params, batch.observations, batch.actions)
        loss = ((q - target_q) ** 2).mean(1).sum()
        return loss, {"critic_loss": loss, "q_data_mean": q.mean(), "target_q_mean": target_q.mean()}

    def actor_loss(actor_params, critic_params, obs, alpha, key):
        actions, log_prob = sample_action(actor_params, obs, key)
        loss = (alpha * log_prob - q_all(critic_params, obs, actions).min(0)).mean()
        return loss, ({"actor_loss": loss, "entropy": -log_prob.mean()}, log_prob)

    def alpha_loss(log_alpha, log_prob, hp: Hyper):
        loss = -(log_alpha * (log_prob + hp.target_entropy)).mean()
        return loss, {"alpha_loss": loss}

    def apply_grads(tx, params, opt_state, grads):
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    def update(s: TrainState, batch: Transitions, key, hp: Hyper):
        k_next, k_actor = jax.random.split(key)
        alpha = jnp.minimum(jnp.exp(s.log_alpha), 1.0)  # OfflineRL-Kit clamps alpha to [0, 1]
        # 1. Critics: soft target from the current actor and the min of the two target critics.
        next_actions, next_log_prob = sample_action(s.actor, batch.next_observations, k_next)
        q_next = q_all(s.target_critic, batch.next_observations, next_actions).min(0) - alpha * next_log_prob
        target_q = jax.lax.stop_gradient(batch.rewards + hp.discount * batch.masks * q_next)
        grads, m_critic = jax.grad(critic_loss, has_aux=True)(s.critic, batch, target_q)
        critic_params, critic_opt = apply_grads(critic_tx, s.critic, s.critic_opt, grads)
        # 2. Actor against the updated critics.
        grads, (m_actor, log_prob) = jax.grad(actor_loss, has_aux=True)(s.actor, critic_params, batch.observations,
                                                                         alpha, k_actor)  # fmt: skip
        actor_params, actor_opt = apply_grads(actor_tx, s.actor, s.actor_opt, grads)
        # 3. Temperature, on the actor step's log-probabilities.
        grads, m_alpha = jax.grad(alpha_loss, has_aux=True)(s.log_alpha, jax.lax.stop_gradient(log_prob), hp)
        log_alpha, alpha_opt = apply_grads(alpha_tx, s.log_alpha, s.alpha_opt, grads)
        target = optax.incremental_update(critic_params, s.target_critic, hp.tau)
        state = TrainState(actor_params, critic_params, target, log_alpha, actor_opt, critic_opt, alpha_opt)
        return state, {**m_critic, **m_actor, **m_alpha, "alpha": alpha}

    def act(actor_params, obs, key, deterministic: bool):
        if deterministic:
            return jnp.tanh(actor.apply(actor_params, obs)[0])
        return sample_action(actor_params, obs, key)[0]

    losses = dict(alpha_loss=alpha_loss, actor_loss=actor_loss, critic_loss=critic_loss, q_all=q_all)
    return init, update, act, sample_action, losses


# --- Training -------------------------------------------------------------------------------------
def make_train_chunk(update, n_real: int, n_model: int, num_updates: int):
    """A jitted scan of `num_updates` updates, vmapped over members (seeds x sweep points, each with its
    own buffer and hp), batches drawn inside the scan."""

    def one_seed(state, buffer, key, data, hp):
        def body(carry, _):
            state, key = carry
            key, k_batch, k_update = jax.random.split(key, 3)
            state, metrics = update(state, sample_mixed(data, buffer, k_batch, n_real, n_model), k_update, hp)
            return (state, key), metrics

        (state, key), metrics = jax.lax.scan(body, (state, key), None, length=num_updates)
        return state, key, metrics

    vmapped = vmap_members(one_seed, in_axes=(0, 0, 0, None, 0))  # hp per member: the sweep's values are traced
    return jax.jit(vmapped, donate_argnums=(0,))


def make_rollouts(args: Args, sample_action, member, disc, done_fn, mode: str):
    """A jitted round of rollouts in the model, vmapped over members: (actor params, buffers, keys, start
    pool, dynamics, dynamics reward, hp) -> (buffers, keys, stats); the pool, the model and r_D are
    shared, each member's penalty is its hp.penalty_coef."""

    def one_seed(actor_params, buffer, key, pool, dynamics, rm, hp):
        key, k_start, k_roll = jax.random.split(key, 3)
        start = pool[jax.random.randint(k_start, (args.rollouts_per_epoch,), 0, pool.shape[0])]
        policy = lambda obs, kk: sample_action(actor_params, obs, kk)[0]  # noqa: E731
        reward_fn = lambda o, a, n: dynamics_reward(disc, rm, o, a, n)  # noqa: E731
        step = lambda obs, a, kk: model_step(member, dynamics, obs, a, kk, done_fn, reward_fn, mode, args,  # noqa: E731
                                             hp.penalty_coef)  # fmt: skip
        transitions, valid, info = generate_rollouts(policy, step, start, k_roll, args.rollout_length)
        return buffer_add(buffer, transitions, valid), key, rollout_stats(transitions, valid, info)

    return jax.jit(vmap_members(one_seed, in_axes=(0, 0, 0, None, None, None, 0)), donate_argnums=(1,))


class PhaseClock:
    """Wall time of the rollout rounds and of the update chunks, for the record's `timing` (what a
    run spends where): each call is timed from an idle device to its results, and the first call of
    each program (its compilation) is left out."""

    def __init__(self, steps_per_round: int):
        self.steps_per_round, self.compiled, self.t = steps_per_round, set(), 0.0
        self.totals = collections.Counter()

    def start(self, state) -> None:
        jax.block_until_ready(state)
        self.t = time.perf_counter()

    def stop(self, program, count: int, kept: float = 0.0, states=None) -> None:
        """count: rollout rounds or updates; kept: transitions the round wrote to the buffers."""
        jax.block_until_ready(states)
        seconds = time.perf_counter() - self.t
        if program not in self.compiled:
            self.compiled.add(program)
            return
        kind = program if isinstance(program, str) else program[0]
        self.totals.update({f"{kind}_s": seconds, kind: count, "kept": kept})

    def read(self) -> dict:
        """Rates since the last read (None where nothing was timed), then start counting anew."""
        t, self.totals = self.totals, collections.Counter()
        per_s = lambda n, s: round(n / s, 1) if s > 0 else None  # noqa: E731
        return {
            "rollout_rounds": t["rollouts"],
            "rollout_round_s": round(t["rollouts_s"] / t["rollouts"], 3) if t["rollouts"] else None,
            "model_steps_per_s": per_s(t["rollouts"] * self.steps_per_round, t["rollouts_s"]),
            "kept_transitions_per_s": per_s(t["kept"], t["rollouts_s"]),
            "updates": t["updates"],
            "updates_per_s": per_s(t["updates"], t["updates_s"]),
        }


def buffer_summary(buffers: ModelBuffer) -> dict:
    size = np.asarray(buffers.size)
    filled = np.arange(buffers.data.rewards.shape[1])[None] < size[:, None]
    mean = lambda x: ((np.asarray(x) * filled).sum(1) / np.maximum(size, 1)).round(4).tolist()  # noqa: E731
    return {"size": size.tolist(), "reward_mean": mean(buffers.data.rewards),
            "terminal_fraction": mean(1.0 - np.asarray(buffers.data.masks))}  # fmt: skip


def train(args: Args) -> dict:
    data, meta = load_dataset(args.dataset)
    args = resolve(args, meta)
    done_fn, done_name = termination_of(meta)
    mode = "none" if args.no_filter else args.filter
    offline = Transitions(data.observations, data.actions, data.rewards, data.next_observations,
                          1.0 - data.terminals.astype(jnp.float32))  # fmt: skip
    init, update, act, sample_action, _ = make_agent(args, meta.obs_dim, meta.action_dim)
    target_entropy = -float(meta.action_dim) if args.target_entropy is None else args.target_entropy
    # Members: every seed of every --sweep point (one point without --sweep), sharded over devices.
    points = sweep_points(args.sweep, args, SWEEPABLE)
    hp = shard(member_hyper(Hyper, args, points, args.num_seeds, target_entropy=target_entropy))
    seeds = list(range(args.seed, args.seed + args.num_seeds))
    members = member_labels(points, seeds)
    keys = jnp.stack([jax.random.key(s) for s in seeds])
    init_keys, keys = jax.vmap(lambda k: tuple(jax.random.split(k)))(keys)
    init_one = jax.jit(init)  # one jitted init per seed: seed i starts as a single-seed run would
    states = jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *[init_one(k) for k in init_keys])
    states, keys = shard(tile(states, len(points))), shard(tile(keys, len(points)))
    capacity = args.rollouts_per_epoch * args.rollout_length * args.retain_epochs
    buffers = jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *[
        empty_buffer(capacity, meta.obs_dim, meta.action_dim) for _ in seeds])  # fmt: skip
    buffers = shard(tile(buffers, len(points)))  # one model buffer per member, empty
    member, disc = DynamicsMember(args.model_hidden_dims, meta.obs_dim + 1), MLP(args.reward_hidden_dims, 1)
    template = model_template(args, meta.obs_dim, meta.action_dim)
    loaded = None
    if args.dynamics_path and not args.resume:  # before the run directory exists: a bad file leaves none
        loaded = load_model(dynamics_file(args.dynamics_path), template, "--dynamics-path")
        if loaded[2].get("dataset_fingerprint") != meta.fingerprint:
            print(f"note: the dynamics model was trained on {loaded[2].get('dataset')} (another build)", flush=True)

    logger = RunLogger("morec", args, meta, seeds=seeds, paper_steps=PAPER_STEPS, points=points)
    print(f"MOREC-MOPO on {args.dataset} ({meta.domain}, {meta.size} transitions): penalty {args.penalty_coef}, "
          f"filter {mode}, K {args.num_elites * args.samples_per_elite}, rollouts {args.rollouts_per_epoch} x "
          f"{args.rollout_length}, termination {done_name}, {args.eval_episodes} eval episodes"
          + (f"; sweep of {len(points)} points x {len(seeds)} seeds: {' '.join(args.sweep)}" if args.sweep else "")
          + (f"; members sharded over {jax.device_count()} devices" if jax.device_count() > 1 else ""),
          flush=True)  # fmt: skip
    if args.total_steps > args.actor_lr_decay_steps:
        print(
            f"note: the actor's learning rate reaches 0 at update {args.actor_lr_decay_steps} "
            "(--actor-lr-decay-steps); the updates after it train the critics and alpha only",
            flush=True,
        )
    path, progress = logger.run_dir / DYNAMICS_FILE, logger.run_dir / MODEL_PROGRESS_FILE
    # A run resumed before its model was saved (killed while it trained) trains it on from there.
    trained = path.exists() or args.eval_only or "dynamics" in logger.record
    if logger.resumed and trained:
        dynamics, rm, info = load_model(path, template, "--resume")
    elif loaded is None:
        if not logger.resumed:  # a checkpoint at step 0: the run can be resumed while its model trains
            logger.save_checkpoint(states, 0, keys, "offline", online=buffers)
        k_dyn, k_rew = jax.random.split(jax.random.fold_in(jax.random.key(args.dynamics_seed), MODEL_STREAM))
        dynamics, info = train_dynamics(args, offline, k_dyn, progress=progress)
        rm, info["reward"] = train_dynamics_reward(args, offline, dynamics, k_rew)
        info.update(dataset=meta.dataset_id, dataset_fingerprint=meta.fingerprint, source="trained",
                    dynamics_seed=args.dynamics_seed)  # fmt: skip
    else:
        dynamics, rm, info = loaded
        info["source"] = str(dynamics_file(args.dynamics_path))
    if not (logger.resumed and trained):
        save_model(path, dynamics, rm, info)
        progress.unlink(missing_ok=True)
        logger.record["dynamics"] = info
        logger.record["presets"] = {"penalty_coef": args.penalty_coef, "filter": args.filter,
                                    "source": "generate_tmuxp_morec_mopo.py"
                                    if (meta.robot, meta.level) in DATASET_PRESETS else "its base values"}  # fmt: skip
    offline, dynamics, rm = replicate(offline), replicate(dynamics), replicate(rm)  # shared by every member
    step = 0
    if logger.resumed:  # the templates are the members' (tiled) states and buffers
        ck = logger.load_checkpoint(states, keys, online_template=buffers)
        states, step, keys, buffers = shard(ck.state), ck.step, shard(ck.rng), shard(ck.online)
        print(f"resumed from step {step}", flush=True)

    @jax.jit
    def policy(actor_params, carry, obs, prev_reward, rng):
        return jax.vmap(lambda p, o: act(p, o, rng, True))(actor_params, obs), carry

    if args.eval_only:
        return logger.loaded(policy, states.actor)
    rollouts = make_rollouts(args, sample_action, member, disc, done_fn, mode)
    n_real = int(args.real_ratio * args.batch_size)
    epoch, chunks = args.updates_per_epoch, {}
    t0, clock = time.time(), PhaseClock(len(members) * args.rollouts_per_epoch * args.rollout_length)
    logger.progress(args.total_steps, initial=step, desc="offline")
    while step < args.total_steps:
        start, target, chunk_metrics, rounds = step, min(step + args.eval_every, args.total_steps), [], []
        while step < target:
            if step % epoch == 0:  # a round of rollouts starts every epoch
                clock.start(states)
                buffers, keys, stats = rollouts(states.actor, buffers, keys, offline.observations, dynamics, rm, hp)
                stats = jax.device_get(stats)
                clock.stop("rollouts", 1, kept=float(np.sum(stats["rollout/mean_length"])) * args.rollouts_per_epoch)
                stats = {name: float(np.mean(v)) for name, v in stats.items()}
                logger.scalars(step, stats)
                rounds.append(stats)
            n = min(epoch - step % epoch, target - step)
            if n not in chunks:
                chunks[n] = make_train_chunk(update, n_real, args.batch_size - n_real, n)
            clock.start(states)
            states, keys, metrics = chunks[n](states, buffers, keys, offline, hp)
            clock.stop(("updates", n), n, states=states)
            chunk_metrics.append(metrics)
            step += n
            logger.advance(n)
        chunk_metrics = jax.device_get(chunk_metrics)
        metrics = {name: np.concatenate([m[name] for m in chunk_metrics], 1) for name in chunk_metrics[0]}
        bad = first_nonfinite(metrics, start, members)
        if bad:
            logger.stop_nonfinite(bad)
        logger.metrics(step, metrics)
        result = evaluate(meta, policy, states.actor, num_episodes=args.eval_episodes, seed=args.seed,
                          video=logger.video(step))  # fmt: skip
        extra = {"model_buffer": buffer_summary(buffers), "timing": clock.read()}
        if rounds:  # the rollout rounds since the last evaluation
            extra["rollouts"] = {k: round(float(np.mean([r[k] for r in rounds])), 4) for k in rounds[0]}
        logger.evaluation(step, result, phase="offline", extra=extra)
        logger.save_checkpoint(states, step, keys, "offline", online=buffers)
    record = logger.close()
    final = record["final"]
    print(f"{args.total_steps} updates ({time.time() - t0:.0f} s in this session); final normalized score "
          f"{final['normalized_mean']:.1f} ± {final['normalized_std']:.1f} (seeds {seeds}); "
          f"record: {logger.run_dir / 'record.json'}", flush=True)  # fmt: skip
    return record


if __name__ == "__main__":
    cli(Args, train, validate=validate)
