"""Reach-Aware Value Learning (RAVL): Sims, Lu, Foerster and Teh, "The Edge-of-Reach Problem in Offline
Model-Based Reinforcement Learning", NeurIPS 2024. https://arxiv.org/abs/2402.12527

Model-based offline RL trains on short k-step rollouts of a learnt model from dataset states. States
that rollouts reach only at their last step are bootstrapped from (as s') but never updated (as s),
so Q's errors there are never corrected and the policy chases them. The paper argues this
"edge-of-reach" problem, not model error, is what uncertainty penalties were fixing: with the TRUE
dynamics in place of the model, where the penalties vanish, MOPO-style methods collapse. RAVL drops
the dynamics penalty and makes the value pessimistic where the data cannot tell instead: EDAC's
ensemble of N critics, the minimum over them in the target, and a term that diversifies their
action-gradients, so that edge-of-reach states show up as ensemble disagreement.

Follows the official code (anyasims/edge-of-reach; its agent is CORL's EDAC, tinkoff-ai/CORL
algorithms/offline/edac.py). Model: 7 probabilistic 4x200 SiLU MLPs giving the mean and log-variance
of (s' - s, r) from standardized (s, a) clipped at 10, PETS' soft log-variance bounds (learnt, shared
by the members, 0.01 bound loss), per-layer L2, a bootstrap set per member (dealt out anew every
epoch), 20% holdout, Adam 1e-3, batch 256, stopped when no member has improved its holdout MSE by 1%
for 5 epochs after epoch 350 (such a plateau before it lowers the learning rate by 0.3, once), 5
elites by holdout MSE. Each epoch of 1000 updates starts with 50,000 k-step rollouts of the current
stochastic actor from dataset states, a random elite per transition, ended by the robot's
termination rule; the model buffer keeps the last 5 epochs (FIFO); a batch takes int(r * 256) rows
of the dataset and the rest from the buffer. Updates: alpha -> actor -> critics (target from the new
actor) -> Polyak targets.

Differences, on purpose: (1) inputs standardized with the dataset's observations and actions (the
official filter sees the next observations and the first observation only); (2) each model epoch
drops its last partial minibatch (fixed shapes for lax.scan); (3) each member keeps its best-holdout
weights and the elites are ranked on them (what the official save-then-load yields); (4) batches and
start states drawn with replacement; (5) rollouts run only the elites (the official runs all 7 and
picks an elite: the same distribution); (6) the diversity term floors the squared gradient norm at
1e-30 so its own gradient stays finite; (7) evaluation every 10 epochs, not every epoch (each
checkpoint holds the 1.25M-row model buffer). One model per run, from --dynamics-seed, shared by
all seeds: the official trains it as a separate artifact that agent runs load, so seeds measure the
agent's spread, a seed of a vmapped run is reproducible alone, and a run pays for one model. It is
saved in the run directory (dynamics.msgpack); --dynamics-path reuses it. Termination: hopper and
walker2d the official rules (Gymnasium v5's healthy ranges), ant Gymnasium's, InvertedPendulum its
env's (test sets), anything else never (halfcheetah, mazes). Presets: the paper's appendix tunes
(N, eta, k, r) per dataset, values not verified here, so every dataset uses the official README's
N 10, eta 1, k 5, r 0.05. --true-dynamics steps the simulator from dataset states instead (host
side; envs whose observation is their joint positions and velocities: hopper, walker2d,
halfcheetah, InvertedPendulum), for the paper's claim: RAVL keeps learning there, while the same
agent without value pessimism (--num-critics 2 --eta 0) collapses. --sweep eta=V1,V2 (or discount,
tau, target_entropy) trains a grid of agents with the seeds as one program (common/members.py): the
dynamics model is trained once per run and shared by every member, so a sweep covers the agent only
(with eta swept, the diversity term is built for all members, times 0 where eta is 0).

    python algorithms/ravl.py --dataset local/hopper/medium-v0 --num-seeds 3   # paper budget (GPU)
    python algorithms/ravl.py --total-steps 50000 --model-max-epochs 30 --rollouts-per-epoch 5000
    python algorithms/ravl.py --dynamics-path runs/ravl/<run>/dynamics.msgpack --num-seeds 3
    python algorithms/ravl.py --true-dynamics --num-critics 2 --eta 0 --rollouts-per-epoch 5000
"""

from __future__ import annotations

import collections
import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

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
    hidden_dims: tuple[int, ...] = (256, 256, 256)
    """hidden sizes of the actor and of every critic"""
    # --- EDAC agent ---
    num_critics: int | None = None
    """N, critics in the ensemble (None: preset 10)"""
    eta: float | None = None
    """weight of EDAC's gradient-diversity term (None: preset 1; 0 skips it)"""
    discount: float = 0.99
    """discount gamma"""
    tau: float = 0.005
    """Polyak rate of the target critics"""
    actor_lr: float = 3e-4
    """actor learning rate"""
    critic_lr: float = 3e-4
    """critic learning rate"""
    alpha_lr: float = 3e-4
    """entropy-temperature learning rate"""
    target_entropy: float | None = None
    """entropy target of the temperature (None: -action_dim)"""
    # --- Model rollouts ---
    rollout_length: int | None = None
    """k, model steps per rollout (None: preset 5)"""
    dataset_ratio: float | None = None
    """r: int(r * batch_size) rows of each batch come from the dataset, the rest from rollouts (None: preset 0.05)"""
    rollouts_per_epoch: int = 50_000
    """rollouts started from dataset states at the start of every epoch"""
    updates_per_epoch: int = 1_000
    """agent updates per epoch (between two rounds of rollouts)"""
    retain_epochs: int = 5
    """the model buffer holds rollouts_per_epoch x k x retain_epochs transitions, FIFO"""
    true_dynamics: bool = False
    """roll out in the simulator from dataset states instead of the model (host side; no model is trained)"""
    # --- Dynamics model ---
    dynamics_path: str | None = None
    """a dynamics.msgpack (or the run directory holding it) of an earlier RAVL run to use instead of training"""
    dynamics_seed: int = 0
    """seed of the model's training (one model for every agent seed)"""
    num_models: int = 7
    """members of the dynamics ensemble"""
    num_elites: int = 5
    """members used in rollouts, the best by holdout MSE"""
    model_hidden_dims: tuple[int, ...] = (200, 200, 200, 200)
    """hidden sizes of every dynamics member"""
    model_lr: float = 1e-3
    """dynamics learning rate (Adam)"""
    model_batch_size: int = 256
    """transitions per member per dynamics update"""
    holdout_ratio: float = 0.2
    """fraction of the dataset held out for early stopping and elite selection"""
    model_max_epochs: int = 2000
    """epochs of dynamics training at most (lower it for CPU budgets)"""
    model_min_epochs: int = 350
    """epochs before early stopping may end dynamics training"""
    # --- Sweep ---
    sweep: tuple[str, ...] = ()
    """agent hyperparameter grid trained with the seeds as one program (one dynamics model for all), e.g.
    --sweep eta=0.5,1 tau=0.005,0.01"""


DEFAULTS = dict(num_critics=10, eta=1.0, rollout_length=5, dataset_ratio=0.05)  # the official README example
PRESETS = {domain: DEFAULTS for domain in ("locomotion", "antmaze", "pointmaze", "adroit", "kitchen")}
# (robot, level) refinements: the paper's appendix tunes (N, eta, k, r) per dataset, not verified here.
DATASET_PRESETS: dict[tuple[str, str], dict] = {}
LOG_STD_MIN, LOG_STD_MAX = -5.0, 2.0  # EDAC's clip of the actor's log-std
HIDDEN_DECAYS, HEAD_DECAY = (2.5e-5, 5e-5, 7.5e-5, 7.5e-5), 1e-4  # official per-layer L2; deeper layers reuse the last
DYNAMICS_FILE = "dynamics.msgpack"
MODEL_PROGRESS_FILE = "dynamics_training.msgpack"  # the model's training loop, while it trains
PAPER_STEPS = (3_000_000, 0)
SWEEPABLE = ("eta", "discount", "tau", "target_entropy")  # the traced agent hyperparameters (Hyper)


def resolve(args: Args, meta: Meta) -> Args:
    """Fill the None fields from the dataset's preset; an explicit flag always wins."""
    preset = {**PRESETS[meta.domain], **DATASET_PRESETS.get((meta.robot, meta.level), {})}
    preset["eval_episodes"] = default_eval_episodes(meta.domain)
    args = dataclasses.replace(args, **{k: v for k, v in preset.items() if getattr(args, k) is None})
    validate(args)
    return args


def validate(args: Args) -> None:
    """RAVL's own flags, checked before anything loads (common's cli checks the shared ones); the
    swept values too, each point's as if given alone."""
    for point in sweep_points(args.sweep, args, SWEEPABLE):
        check_flags(dataclasses.replace(args, **point))
    if args.dynamics_path and not args.resume and not dynamics_file(args.dynamics_path).is_file():
        raise UserError(f"--dynamics-path {args.dynamics_path}: no such file; give the {DYNAMICS_FILE} (or the "
                        "run directory) of an earlier RAVL run")  # fmt: skip


def check_flags(args: Args) -> None:
    checks = [
        (args.num_critics is None or args.num_critics >= 1, f"--num-critics must be at least 1: {args.num_critics}"),
        (args.eta is None or args.eta >= 0, f"--eta must be 0 or more, got {args.eta}"),
        (not (args.eta and args.num_critics == 1), "--eta > 0 needs --num-critics 2 or more (a diversity of one)"),
        (args.rollout_length is None or args.rollout_length >= 1, "--rollout-length must be at least 1"),
        (args.dataset_ratio is None or 0 <= args.dataset_ratio <= 1, "--dataset-ratio must be in [0, 1]"),
        (min(args.rollouts_per_epoch, args.updates_per_epoch, args.retain_epochs) >= 1,
         "--rollouts-per-epoch, --updates-per-epoch and --retain-epochs must be at least 1"),
        (1 <= args.num_elites <= args.num_models, "--num-elites must be between 1 and --num-models"),
        (0 < args.holdout_ratio < 1, f"--holdout-ratio must be in (0, 1), got {args.holdout_ratio}"),
        (args.model_max_epochs >= 1 and args.model_min_epochs >= 0,
         "--model-max-epochs must be at least 1 and --model-min-epochs 0 or more"),
        (args.model_batch_size >= 1, "--model-batch-size must be at least 1"),
        (min(args.actor_lr, args.critic_lr, args.alpha_lr, args.model_lr) > 0, "learning rates must be positive"),
        (0.0 <= args.discount < 1.0, f"--discount must be in [0, 1), got {args.discount}"),
        (0.0 < args.tau <= 1.0, f"--tau must be in (0, 1], got {args.tau}"),
        (not (args.true_dynamics and args.dynamics_path), "--true-dynamics steps the simulator: drop --dynamics-path"),
    ]  # fmt: skip
    for ok, message in checks:
        if not ok:
            raise UserError(message)


def dynamics_file(path: str) -> Path:
    path = Path(path)
    return path / DYNAMICS_FILE if path.is_dir() else path


# --- Termination of model rollouts ----------------------------------------------------------------
def hopper_done(obs):
    """The official rule (= Gymnasium Hopper-v5's healthy ranges): finite, |obs[1:]| < 100, height >
    0.7, |angle| < 0.2."""
    healthy = jnp.isfinite(obs).all(-1) & (jnp.abs(obs[..., 1:]) < 100).all(-1)
    return ~(healthy & (obs[..., 0] > 0.7) & (jnp.abs(obs[..., 1]) < 0.2))


def walker2d_done(obs):
    """The official rule (= Walker2d-v5's): 0.8 < height < 2 and -1 < angle < 1 (NaN fails both)."""
    return ~((obs[..., 0] > 0.8) & (obs[..., 0] < 2.0) & (obs[..., 1] > -1.0) & (obs[..., 1] < 1.0))


def ant_done(obs):
    """Ant-v5's: finite and 0.2 <= torso height <= 1."""
    return ~(jnp.isfinite(obs).all(-1) & (obs[..., 0] >= 0.2) & (obs[..., 0] <= 1.0))


def inverted_pendulum_done(obs):
    """InvertedPendulum-v5's: non-finite, or the pole's angle beyond 0.2."""
    return ~jnp.isfinite(obs).all(-1) | (jnp.abs(obs[..., 1]) > 0.2)


def never_done(obs):
    return jnp.zeros(obs.shape[:-1], bool)


TERMINATION = {"hopper": hopper_done, "walker2d": walker2d_done, "ant": ant_done,
               "invertedpendulum": inverted_pendulum_done, "halfcheetah": never_done}  # fmt: skip


def termination_of(meta: Meta):
    """(done function, name) for the dataset's env: hopper-v5 -> hopper; unknown envs never terminate."""
    env = meta.env_spec.id.split("-")[0].lower()
    return TERMINATION.get(env, never_done), env if env in TERMINATION else f"never ({meta.env_spec.id})"


# The model's random stream, apart from the agents' (jax.random.key(seed)): with --seed equal to
# --dynamics-seed, seed 0's agent would otherwise draw the keys of the model's holdout split.
MODEL_STREAM = 0x6D6F64  # "mod"


# --- Networks -------------------------------------------------------------------------------------
def uniform_init(scale: float):
    return lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype, -scale, scale)


TORCH_LINEAR = nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform")  # PyTorch's nn.Linear weights
# The official critic (CORL's VectorizedLinear) stores each weight as (in, out) and inits it with
# kaiming_uniform_, which takes fan_in from the last axis: U(+-1/sqrt(out)), 1/16 on every 256-wide layer.
VECTORIZED_LINEAR = nn.initializers.variance_scaling(1 / 3, "fan_out", "uniform")


def trunc_normal_init(key, shape, dtype=jnp.float32):
    """The official dynamics init: N(0, std) truncated at +-2 std, std = 1 / (2 sqrt(fan_in))."""
    return jax.random.truncated_normal(key, -2.0, 2.0, shape, dtype) / (2.0 * np.sqrt(shape[0]))


class Actor(nn.Module):
    """Tanh-Gaussian policy (EDAC's init: hidden biases 0.1, heads U(-1e-3, 1e-3))."""

    hidden_dims: tuple[int, ...]
    action_dim: int

    @nn.compact
    def __call__(self, obs):
        x = obs
        for d in self.hidden_dims:
            x = nn.relu(nn.Dense(d, kernel_init=TORCH_LINEAR, bias_init=nn.initializers.constant(0.1))(x))
        head = dict(kernel_init=uniform_init(1e-3), bias_init=uniform_init(1e-3))
        mean, log_std = nn.Dense(self.action_dim, **head)(x), nn.Dense(self.action_dim, **head)(x)
        return mean, jnp.clip(log_std, LOG_STD_MIN, LOG_STD_MAX)


class Critic(nn.Module):
    """One Q network (EDAC's init as the official code does it: hidden weights U(+-1/sqrt(width)), the
    first layer's included, biases 0.1, last layer U(-3e-3, 3e-3)); the ensemble is N parameter sets
    stacked on a leading axis. No orthogonal init, so a vmapped init has no QR."""

    hidden_dims: tuple[int, ...]

    @nn.compact
    def __call__(self, obs, action):
        x = jnp.concatenate([obs, action], -1)
        for d in self.hidden_dims:
            x = nn.relu(nn.Dense(d, kernel_init=VECTORIZED_LINEAR, bias_init=nn.initializers.constant(0.1))(x))
        return nn.Dense(1, kernel_init=uniform_init(3e-3), bias_init=uniform_init(3e-3))(x)[..., 0]


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
    """A trained model: what rollouts need (device arrays; saved as dynamics.msgpack)."""

    members: dict  # every member's parameters, stacked (num_models, ...)
    max_logvar: jax.Array  # (obs_dim + 1,), learnt, shared by the members
    min_logvar: jax.Array
    input_mean: jax.Array  # (obs_dim + action_dim,)
    input_std: jax.Array
    elites: jax.Array  # (num_elites,) int32, lowest holdout MSE first


class Transitions(NamedTuple):
    observations: jax.Array
    actions: jax.Array
    rewards: jax.Array
    next_observations: jax.Array
    masks: jax.Array  # 1 - terminal: truncation still bootstraps


class ModelBuffer(NamedTuple):
    """One seed's FIFO of model transitions: rows [0, size) are filled, the next goes to ptr."""

    data: Transitions
    ptr: jax.Array
    size: jax.Array


class TrainState(NamedTuple):
    """Everything one seed trains."""

    actor: dict
    critic: dict  # N critics' parameters, stacked
    target_critic: dict
    log_alpha: jax.Array
    actor_opt: optax.OptState
    critic_opt: optax.OptState
    alpha_opt: optax.OptState


class Hyper(NamedTuple):
    """Numeric hyperparameters that do not change shapes, as float32 arrays (vmappable)."""

    eta: jax.Array
    discount: jax.Array
    tau: jax.Array
    target_entropy: jax.Array


# --- The dynamics model ---------------------------------------------------------------------------
def ensemble_apply(member, members, max_logvar, min_logvar, x, x_axis=None):
    """Every member on x (B, in), or member i on x[i] with x_axis=0: means, logvars (M, B, out)."""
    return jax.vmap(lambda p, xi: member.apply(p, xi, max_logvar, min_logvar), in_axes=(0, x_axis))(members, x)


def weight_decay(members, num_hidden: int):
    """The official L2 (PyTorch Adam's weight_decay, i.e. gradient + decay * w) as the loss 0.5 decay |w|^2,
    on kernels only, summed over the members."""
    p = members["params"]
    decays = [(f"hidden_{i}", HIDDEN_DECAYS[min(i, len(HIDDEN_DECAYS) - 1)]) for i in range(num_hidden)]
    decays += [("mean", HEAD_DECAY), ("logvar", HEAD_DECAY)]
    return 0.5 * sum(d * (p[name]["kernel"] ** 2).sum() for name, d in decays)


def dynamics_loss(trainable, member, x, y, num_hidden: int):
    """Gaussian NLL of each member on its own batch (x (M, B, in), y (M, B, out)), mean over batch and
    outputs, summed over members, plus L2 and 0.01 * (sum max_logvar - sum min_logvar)."""
    mean, logvar = ensemble_apply(member, trainable["members"], trainable["max_logvar"], trainable["min_logvar"], x, 0)
    nll = (logvar + (y - mean) ** 2 * jnp.exp(-logvar)).mean((1, 2))
    bound = 0.01 * (trainable["max_logvar"].sum() - trainable["min_logvar"].sum())
    return nll.sum() + weight_decay(trainable["members"], num_hidden) + bound, nll.mean()


def make_dynamics_fns(member, num_hidden: int, tx, batch: int):
    """Jitted (one epoch over bootstrap minibatches, every member at once; holdout MSE per member)."""

    @jax.jit
    def epoch(trainable, opt_state, key, x, y, boot):  # boot (M, n_train): each bootstrap set's rows
        k_rows, k_members = jax.random.split(key)
        num_batches = boot.shape[1] // batch
        rows = jax.random.permutation(k_rows, boot.shape[1])[: num_batches * batch].reshape(num_batches, batch)
        sets = jax.random.permutation(k_members, boot.shape[0])  # the official deals the sets out anew
        idx = boot[sets][:, rows].transpose(1, 0, 2)  # (num_batches, M, batch)

        def body(carry, idx_b):
            trainable, opt_state = carry
            (loss, nll), grads = jax.value_and_grad(dynamics_loss, has_aux=True)(
                trainable, member, x[idx_b], y[idx_b], num_hidden
            )
            updates, opt_state = tx.update(grads, opt_state, trainable)
            return (optax.apply_updates(trainable, updates), opt_state), nll

        (trainable, opt_state), nll = jax.lax.scan(body, (trainable, opt_state), idx)
        return trainable, opt_state, nll.mean()

    @jax.jit
    def holdout_mse(trainable, x, y):  # MSE of the means, per member, in chunks of at most 8192 rows
        n = x.shape[0]
        chunk = min(n, 8192)
        num = -(-n // chunk)
        pad = lambda a: jnp.pad(a, ((0, num * chunk - n), (0, 0))).reshape(num, chunk, -1)  # noqa: E731
        weight = (jnp.arange(num * chunk) < n).reshape(num, chunk)

        def one(args):
            xc, yc, wc = args
            mean, _ = ensemble_apply(member, trainable["members"], trainable["max_logvar"],
                                     trainable["min_logvar"], xc)  # fmt: skip
            return (((yc - mean) ** 2).mean(-1) * wc).sum(-1)

        return jax.lax.map(one, (pad(x), pad(y), weight)).sum(0) / n

    return epoch, holdout_mse


def dynamics_inputs(data: Transitions):
    """(inputs (s, a), targets (s' - s, r)) as numpy arrays."""
    obs, next_obs = np.asarray(data.observations), np.asarray(data.next_observations)
    x = np.concatenate([obs, np.asarray(data.actions)], -1)
    return x, np.concatenate([next_obs - obs, np.asarray(data.rewards)[:, None]], -1)


def train_dynamics(
    args: Args, data: Transitions, key, log=print, progress: Path | None = None
) -> tuple[Dynamics, dict]:
    """The official training: host loop over jitted epochs with its early-stopping rule. With
    `progress`, the loop's state is written there after every epoch and a file already there is
    continued from: a run killed while its model trains resumes at its last epoch, with the model an
    uninterrupted training gives."""
    t0 = time.time()
    x, y = dynamics_inputs(data)
    mean, std = x.mean(0), x.std(0)
    std = np.where(std < 1e-12, 1.0, std)
    xn = jnp.asarray(np.clip((x - mean) / std, -10, 10), jnp.float32)
    y = jnp.asarray(y, jnp.float32)
    k_split, k_boot, k_init, key = jax.random.split(key, 4)
    n, m = len(x), args.num_models
    perm = jax.random.permutation(k_split, n)
    n_hold = max(1, int(n * args.holdout_ratio))
    x_hold, y_hold, x_train, y_train = xn[perm[:n_hold]], y[perm[:n_hold]], xn[perm[n_hold:]], y[perm[n_hold:]]
    boot = jax.random.randint(k_boot, (m, n - n_hold), 0, n - n_hold)
    member = DynamicsMember(args.model_hidden_dims, y.shape[1])
    max_lv, min_lv = jnp.full(y.shape[1], 0.5, jnp.float32), jnp.full(y.shape[1], -10.0, jnp.float32)
    init = jax.jit(jax.vmap(member.init, in_axes=(0, None, None, None)))  # no orthogonal init: no QR to batch
    members = init(jax.random.split(k_init, m), xn[:1], max_lv, min_lv)
    trainable = {"members": members, "max_logvar": max_lv, "min_logvar": min_lv}
    tx = optax.inject_hyperparams(optax.adam)(learning_rate=jnp.float32(args.model_lr))  # float32: one trace
    opt_state = tx.init(trainable)
    batch = min(args.model_batch_size, n - n_hold)
    epoch, holdout_mse = make_dynamics_fns(member, len(args.model_hidden_dims), tx, batch)

    best_mse, best_members = np.full(m, np.inf), members
    history: collections.deque = collections.deque(maxlen=6)  # did any member improve, per check

    def check(trainable):
        nonlocal best_mse, best_members
        mse = np.asarray(holdout_mse(trainable, x_hold, y_hold))
        improved = mse < 0.99 * best_mse  # the official (best - mse) / best > 1%
        best_mse = np.where(improved, mse, best_mse)
        pick = lambda b, c: jnp.where(improved.reshape(-1, *[1] * (c.ndim - 1)), c, b)  # noqa: E731
        best_members = jax.tree_util.tree_map(pick, best_members, trainable["members"])
        history.append(bool(improved.any()))
        return mse

    def save(done: int) -> None:
        loop = dict(epochs=done, key=jax.random.key_data(key), trainable=trainable, opt_state=opt_state,
                    best_mse=best_mse, best_members=best_members, history=np.asarray(history, np.int8),
                    lowered_at=-1 if lowered_at is None else lowered_at, seconds=time.time() - t0)  # fmt: skip
        atomic_write(progress, serialization.msgpack_serialize(serialization.to_state_dict(jax.device_get(loop))))

    lowered_at, stop, done = None, "max_epochs", 0
    if progress is not None and progress.exists():
        try:
            raw = serialization.msgpack_restore(progress.read_bytes())
            done, key, lowered_at = int(raw["epochs"]), jax.random.wrap_key_data(raw["key"]), int(raw["lowered_at"])
            trainable = serialization.from_state_dict(trainable, raw["trainable"])
            opt_state = serialization.from_state_dict(opt_state, raw["opt_state"])
            best_members = serialization.from_state_dict(best_members, raw["best_members"])
            best_mse, t0 = np.asarray(raw["best_mse"]), t0 - float(raw["seconds"])
        except Exception as e:
            raise UserError(f"{progress}: not this run's model training ({type(e).__name__}); delete it to train "
                            "the model from its start") from None  # fmt: skip
        lowered_at = None if lowered_at < 0 else lowered_at
        history.extend(bool(h) for h in np.asarray(raw["history"]))
        log(f"dynamics: continuing from epoch {done} ({progress.name})", flush=True)
    else:
        check(trainable)
    logged = time.time()
    for i in range(done, args.model_max_epochs):
        key, k_epoch = jax.random.split(key)
        trainable, opt_state, nll = epoch(trainable, opt_state, k_epoch, x_train, y_train, boot)
        mse, done = check(trainable), i + 1
        if i % 25 == 0 or i + 1 == args.model_max_epochs or time.time() - logged >= 60:  # epochs can take a minute
            logged = time.time()
            log(f"dynamics epoch {i + 1}: train NLL {float(nll):.4f}, holdout MSE {[round(float(v), 5) for v in mse]} "
                f"({time.time() - t0:.0f} s)", flush=True)  # fmt: skip
        if len(history) == 6 and not any(list(history)[1:]):  # no member improved for 5 epochs
            if i >= args.model_min_epochs:
                stop = "early"
                break
            if lowered_at is None:
                opt_state.hyperparams["learning_rate"] = opt_state.hyperparams["learning_rate"] * 0.3
                lowered_at = i + 1
                history.clear()
                history.append(True)
        if progress is not None:
            save(done)
    elites = np.argsort(best_mse, kind="stable")[: args.num_elites]
    dynamics = Dynamics(best_members, trainable["max_logvar"], trainable["min_logvar"], jnp.float32(mean),
                        jnp.float32(std), jnp.asarray(elites, jnp.int32))  # fmt: skip
    info = dict(epochs=done, stopped=stop, lr_lowered_at_epoch=lowered_at, holdout_mse=np.round(best_mse, 6).tolist(),
                elites=elites.tolist(), holdout_rows=n_hold, train_seconds=round(time.time() - t0, 1))  # fmt: skip
    log(f"dynamics: {info['epochs']} epochs ({stop}), elites {elites.tolist()}, holdout MSE "
        f"{[round(float(v), 5) for v in best_mse[elites]]}", flush=True)  # fmt: skip
    return dynamics, info


def dynamics_template(args: Args, obs_dim: int, action_dim: int) -> Dynamics:
    """An untrained model of this run's shapes (what a loaded file must match)."""
    member = DynamicsMember(args.model_hidden_dims, obs_dim + 1)
    x, lv = jnp.zeros((1, obs_dim + action_dim)), jnp.zeros(obs_dim + 1)
    members = jax.eval_shape(jax.vmap(member.init, in_axes=(0, None, None, None)),
                             jax.random.split(jax.random.key(0), args.num_models), x, lv, lv)  # fmt: skip
    members = jax.tree_util.tree_map(lambda s: np.zeros(s.shape, s.dtype), members)
    z = np.zeros(obs_dim + action_dim, np.float32)
    return Dynamics(members, lv, lv, z, z, np.zeros(args.num_elites, np.int32))


def save_dynamics(path: Path, dynamics: Dynamics, info: dict) -> None:
    payload = {"dynamics": serialization.to_state_dict(jax.device_get(dynamics)), "info": json.dumps(info)}
    atomic_write(path, serialization.msgpack_serialize(payload))


def load_dynamics(path: Path, template: Dynamics, flag: str) -> tuple[Dynamics, dict]:
    """A saved model shaped like `template`, or one clear error naming the file."""
    try:
        raw = serialization.msgpack_restore(path.read_bytes())
        info = json.loads(raw["info"])
        dynamics = serialization.from_state_dict(template, raw["dynamics"])
        fits = jax.tree_util.tree_map(lambda a, b: np.shape(a) == np.shape(b), template, dynamics)
    except Exception as e:
        raise UserError(f"{flag} {path}: not a RAVL dynamics model ({type(e).__name__}); give the {DYNAMICS_FILE} "
                        "an earlier RAVL run wrote in its run directory") from None  # fmt: skip
    if not all(jax.tree_util.tree_leaves(fits)):
        raise UserError(f"{flag} {path}: its model ({info.get('num_models')} members of {info.get('hidden_dims')}, "
                        f"observations {info.get('obs_dim')}, actions {info.get('action_dim')}) does not fit this run; "
                        "give the run's --num-models, --num-elites and --model-hidden-dims")  # fmt: skip
    return Dynamics(*(jax.tree_util.tree_map(jnp.asarray, x) for x in dynamics)), info


# --- Rollouts and the model buffer ----------------------------------------------------------------
def model_step(member, dyn: Dynamics, obs, actions, key, done_fn):
    """One model step: a Gaussian sample from a uniformly random elite per row -> (s', r, done)."""
    x = jnp.clip((jnp.concatenate([obs, actions], -1) - dyn.input_mean) / dyn.input_std, -10.0, 10.0)
    elite_members = jax.tree_util.tree_map(lambda p: p[dyn.elites], dyn.members)
    mean, logvar = ensemble_apply(member, elite_members, dyn.max_logvar, dyn.min_logvar, x)  # (E, n, obs_dim + 1)
    k_elite, k_noise = jax.random.split(key)
    pick, rows = jax.random.randint(k_elite, obs.shape[:1], 0, mean.shape[0]), jnp.arange(obs.shape[0])
    mean, logvar = mean[pick, rows], logvar[pick, rows]
    sample = mean + jnp.exp(0.5 * logvar) * jax.random.normal(k_noise, mean.shape)
    next_obs = obs + sample[:, :-1]
    return next_obs, sample[:, -1], done_fn(next_obs)


def generate_rollouts(policy, step, start_obs, key, k: int):
    """k steps from start_obs (n, d) under policy(obs, key) and step(obs, action, key) -> (s', r, done):
    transitions (k, n, ...) and valid (k, n), false after a rollout's terminal step (the official
    removes terminated rollouts; here they keep stepping, masked)."""

    def body(carry, key):
        obs, alive = carry
        k_action, k_step = jax.random.split(key)
        actions = policy(obs, k_action)
        next_obs, rewards, done = step(obs, actions, k_step)
        out = Transitions(obs, actions, rewards, next_obs, 1.0 - done.astype(jnp.float32))
        return (next_obs, alive & ~done), (out, alive)

    _, (transitions, valid) = jax.lax.scan(body, (start_obs, jnp.ones(start_obs.shape[:1], bool)),
                                           jax.random.split(key, k))  # fmt: skip
    return transitions, valid


def empty_buffer(capacity: int, obs_dim: int, action_dim: int) -> ModelBuffer:
    shapes = [(obs_dim,), (action_dim,), (), (obs_dim,), ()]
    data = Transitions(*(jnp.zeros((capacity, *s), jnp.float32) for s in shapes))
    return ModelBuffer(data, jnp.zeros((), jnp.int32), jnp.zeros((), jnp.int32))


def buffer_add(buffer: ModelBuffer, transitions: Transitions, valid) -> ModelBuffer:
    """Append the valid rows (in step order, as the official adds them step by step), FIFO.
    Needs valid.size <= capacity (true by construction: capacity = n * k * retain_epochs)."""
    lead, valid = valid.ndim, valid.reshape(-1)
    flat = jax.tree_util.tree_map(lambda x: x.reshape(valid.shape[0], *x.shape[lead:]), transitions)
    order = jnp.argsort(jnp.where(valid, 0, 1), stable=True)  # valid rows first, in order
    count = valid.sum().astype(jnp.int32)
    capacity, i = buffer.data.rewards.shape[0], jnp.arange(valid.shape[0])
    slots = jnp.where(i < count, (buffer.ptr + i) % capacity, capacity)  # out of range: dropped
    data = jax.tree_util.tree_map(lambda b, x: b.at[slots].set(x[order], mode="drop"), buffer.data, flat)
    return ModelBuffer(data, (buffer.ptr + count) % capacity, jnp.minimum(buffer.size + count, capacity))


def add_rollouts(buffer: ModelBuffer, transitions: Transitions, valid):
    """buffer_add plus what the rollouts looked like."""
    stats = {"rollout/mean_length": valid.sum(0).mean(),
             "rollout/mean_reward": (transitions.rewards * valid).sum() / jnp.maximum(valid.sum(), 1)}  # fmt: skip
    return buffer_add(buffer, transitions, valid), stats


def sample_mixed(data: Transitions, buffer: ModelBuffer, key, n_real: int, n_model: int) -> Transitions:
    """n_real dataset rows then n_model rows from the filled part of the model buffer."""
    k_real, k_model = jax.random.split(key)
    real = jax.random.randint(k_real, (n_real,), 0, data.rewards.shape[0])
    model = jax.random.randint(k_model, (n_model,), 0, jnp.maximum(buffer.size, 1))
    return jax.tree_util.tree_map(lambda d, b: jnp.concatenate([d[real], b[model]]), data, buffer.data)


class Simulator:
    """The dataset's MuJoCo env stepped from observations: qpos = (0 for each coordinate the observation
    skips, e.g. the x position, then its qpos part), qvel = the rest. Hopper's and Walker2d's
    observations clip qvel at +-10, so states beyond that are approximate."""

    def __init__(self, meta: Meta):
        self.meta, self.env = meta, meta.make_env()
        u = self.env.unwrapped
        s = getattr(u, "observation_structure", None) or {}
        model = getattr(u, "model", None)
        if not (model is not None and set(s) <= {"skipped_qpos", "qpos", "qvel"} and "qpos" in s
                and s.get("skipped_qpos", 0) + s["qpos"] == model.nq and s.get("qvel") == model.nv
                and s["qpos"] + s["qvel"] == meta.obs_dim):  # fmt: skip
            raise UserError(f"--true-dynamics needs an env whose observation is its joint positions and "
                            f"velocities (hopper, walker2d, halfcheetah, InvertedPendulum); {meta.env_spec.id} "
                            "is not")  # fmt: skip
        self.env.reset(seed=0)
        self.u, self.skipped, self.nqpos = u, s.get("skipped_qpos", 0), s["qpos"]

    def state_of(self, obs):
        obs = np.asarray(obs, np.float64)
        return np.concatenate([np.zeros(self.skipped), obs[: self.nqpos]]), obs[self.nqpos :].copy()

    def step(self, qpos, qvel, action):
        """-> next observation, reward, terminated, next (qpos, qvel): a function of its arguments only
        (the solver's warm start is cleared, so a resumed run steps exactly as an uninterrupted one)."""
        self.u.data.qacc_warmstart[:] = 0.0
        self.u.set_state(qpos, qvel)
        obs, reward, terminated, _, _ = self.u.step(self.meta.to_env_action(action))
        return obs, reward, terminated, (self.u.data.qpos.copy(), self.u.data.qvel.copy())


# --- The agent ------------------------------------------------------------------------------------
def tanh_gaussian_log_prob(mean, log_std, u):
    """log pi of tanh(u), u ~ N(mean, std), the official way: - sum log(1 - tanh(u)^2 + 1e-6)."""
    gauss = -0.5 * ((u - mean) / jnp.exp(log_std)) ** 2 - log_std - 0.5 * jnp.log(2 * jnp.pi)
    return gauss.sum(-1) - jnp.log(1.0 - jnp.tanh(u) ** 2 + 1e-6).sum(-1)


def edac_diversity(q_fn, critic_params, obs, actions):
    """EDAC's ensemble gradient diversity: g_i = grad_a Q_i(s, a) / (|grad_a Q_i| + 1e-10), the loss
    mean over the batch of sum_{i != j} <g_i, g_j>, divided by N - 1. q_fn(params_i, obs, actions)
    -> (B,); critic_params stacked over N. Differentiable in the parameters (second order)."""
    grads = jax.vmap(lambda p: jax.grad(lambda a: q_fn(p, obs, a).sum())(actions))(critic_params)  # (N, B, A)
    norm = jnp.sqrt(jnp.maximum((grads**2).sum(-1, keepdims=True), 1e-30))
    unit = grads / (norm + 1e-10)
    gram = jnp.einsum("ibk,jbk->bij", unit, unit)
    off_diagonal = gram.sum((1, 2)) - jnp.trace(gram, axis1=1, axis2=2)
    return off_diagonal.mean() / (grads.shape[0] - 1)


def make_agent(args: Args, obs_dim: int, action_dim: int):
    """init, update, act and sample_action for one seed, and the losses (for tests)."""
    actor, critic = Actor(args.hidden_dims, action_dim), Critic(args.hidden_dims)
    actor_tx, critic_tx, alpha_tx = optax.adam(args.actor_lr), optax.adam(args.critic_lr), optax.adam(args.alpha_lr)
    # Static: with eta 0 (on every --sweep point) the second-order term is not built at all.
    diversity_on = any(point.get("eta", args.eta) > 0 for point in sweep_points(args.sweep, args, SWEEPABLE))

    def q_all(params, obs, actions):  # (N, B)
        return jax.vmap(critic.apply, in_axes=(0, None, None))(params, obs, actions)

    def init(key) -> TrainState:
        k_actor, k_critic = jax.random.split(key)
        obs, act = jnp.zeros((1, obs_dim)), jnp.zeros((1, action_dim))
        actor_params = actor.init(k_actor, obs)
        critic_params = jax.vmap(critic.init, in_axes=(0, None, None))(
            jax.random.split(k_critic, args.num_critics), obs, act
        )
        log_alpha = jnp.zeros(())
        target = jax.tree_util.tree_map(jnp.copy, critic_params)  # own buffers: the state is donated
        opts = actor_tx.init(actor_params), critic_tx.init(critic_params), alpha_tx.init(log_alpha)
        return TrainState(actor_params, critic_params, target, log_alpha, *opts)

    def sample_action(actor_params, obs, key):
        mean, log_std = actor.apply(actor_params, obs)
        u = mean + jnp.exp(log_std) * jax.random.normal(key, mean.shape)
        return jnp.tanh(u), tanh_gaussian_log_prob(mean, log_std, u)

    def alpha_loss(log_alpha, log_prob, hp: Hyper):
        loss = (-log_alpha * (log_prob + hp.target_entropy)).mean()
        return loss, {"alpha_loss": loss}

    def actor_loss(actor_params, critic_params, obs, alpha, key):
        actions, log_prob = sample_action(actor_params, obs, key)
        q = q_all(critic_params, obs, actions)
        loss = (alpha * log_prob - q.min(0)).mean()
        return loss, {"actor_loss": loss, "entropy": -log_prob.mean(), "q_policy_mean": q.mean(),
                      "q_policy_std": q.std(0).mean()}  # fmt: skip

    def critic_loss(critic_params, batch: Transitions, target_q, hp: Hyper):
        q = q_all(critic_params, batch.observations, batch.actions)
        bellman = ((q - target_q) ** 2).mean(1).sum()
        metrics = {"bellman_loss": bellman, "q_data_mean": q.mean(), "target_q_mean": target_q.mean()}
        loss = bellman
        if diversity_on:
            diversity = edac_diversity(critic.apply, critic_params, batch.observations, batch.actions)
            loss, metrics["diversity"] = bellman + hp.eta * diversity, diversity
        return loss, {"critic_loss": loss, **metrics}

    def apply_grads(tx, params, opt_state, grads):
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    def update(s: TrainState, batch: Transitions, key, hp: Hyper):
        k_alpha, k_actor, k_next = jax.random.split(key, 3)
        obs = batch.observations
        # 1. The temperature, on a fresh sample of the current actor.
        log_prob = jax.lax.stop_gradient(sample_action(s.actor, obs, k_alpha)[1])
        grads, m_alpha = jax.grad(alpha_loss, has_aux=True)(s.log_alpha, log_prob, hp)
        log_alpha, alpha_opt = apply_grads(alpha_tx, s.log_alpha, s.alpha_opt, grads)
        alpha = jnp.exp(log_alpha)
        # 2. The actor against the critics before their update, with the new alpha.
        grads, m_actor = jax.grad(actor_loss, has_aux=True)(s.actor, s.critic, obs, alpha, k_actor)
        actor_params, actor_opt = apply_grads(actor_tx, s.actor, s.actor_opt, grads)
        # 3. The critics: soft target from the new actor and the min over the target ensemble.
        next_actions, next_log_prob = sample_action(actor_params, batch.next_observations, k_next)
        q_next = q_all(s.target_critic, batch.next_observations, next_actions).min(0) - alpha * next_log_prob
        target_q = jax.lax.stop_gradient(batch.rewards + hp.discount * batch.masks * q_next)
        grads, m_critic = jax.grad(critic_loss, has_aux=True)(s.critic, batch, target_q, hp)
        critic_params, critic_opt = apply_grads(critic_tx, s.critic, s.critic_opt, grads)
        # 4. Polyak averaging of the target critics.
        target = optax.incremental_update(critic_params, s.target_critic, hp.tau)
        state = TrainState(actor_params, critic_params, target, log_alpha, actor_opt, critic_opt, alpha_opt)
        return state, {**m_alpha, **m_actor, **m_critic, "alpha": alpha}

    def act(actor_params, obs, key, deterministic: bool):
        if deterministic:
            return jnp.tanh(actor.apply(actor_params, obs)[0])
        return sample_action(actor_params, obs, key)[0]

    losses = dict(alpha_loss=alpha_loss, actor_loss=actor_loss, critic_loss=critic_loss, q_all=q_all)
    return init, update, act, sample_action, losses


# --- Training -------------------------------------------------------------------------------------
def make_train_chunk(update, n_real: int, n_model: int, num_updates: int):
    """A jitted scan of `num_updates` updates, vmapped over members (seeds x sweep points, each with its
    own buffer and hp); each batch mixes dataset and model rows, drawn inside the scan from
    device-resident data."""

    def one_seed(state, buffer, key, data, hp):
        def body(carry, _):
            state, key = carry
            key, k_batch, k_update = jax.random.split(key, 3)
            state, metrics = update(state, sample_mixed(data, buffer, k_batch, n_real, n_model), k_update, hp)
            return (state, key), metrics

        (state, key), metrics = jax.lax.scan(body, (state, key), None, length=num_updates)
        return state, key, metrics  # metrics: (num_updates,) each

    vmapped = vmap_members(one_seed, in_axes=(0, 0, 0, None, 0))  # hp per member: the sweep's values are traced
    return jax.jit(vmapped, donate_argnums=(0,))


def make_model_rollouts(sample_action, member, done_fn, num: int, k: int):
    """A jitted round of rollouts in the model, vmapped over members: (actor params, buffers, keys,
    start pool, dynamics) -> (buffers, keys, stats); the pool and the dynamics are shared."""

    def one_seed(actor_params, buffer, key, pool, dynamics):
        key, k_start, k_roll = jax.random.split(key, 3)
        start = pool[jax.random.randint(k_start, (num,), 0, pool.shape[0])]
        policy = lambda obs, kk: sample_action(actor_params, obs, kk)[0]  # noqa: E731
        step = lambda obs, a, kk: model_step(member, dynamics, obs, a, kk, done_fn)  # noqa: E731
        buffer, stats = add_rollouts(buffer, *generate_rollouts(policy, step, start, k_roll, k))
        return buffer, key, stats

    return jax.jit(vmap_members(one_seed, in_axes=(0, 0, 0, None, None)), donate_argnums=(1,))


def make_simulator_rollouts(sample_action, sim: Simulator, num: int, k: int):
    """The same round of rollouts, stepped in the simulator on the host (one jitted actor call per step)."""

    def draw(key, pool):
        key, k_start, k_roll = jax.random.split(key, 3)
        return key, jax.random.split(k_roll, k), jax.random.randint(k_start, (num,), 0, pool.shape[0])

    starts = jax.jit(jax.vmap(draw, in_axes=(0, None)))
    act = jax.jit(jax.vmap(lambda p, o, key: sample_action(p, o, key)[0]))
    add = jax.jit(jax.vmap(add_rollouts), donate_argnums=(0,))

    def rollouts(actor_params, buffers, keys, pool, dynamics=None):
        keys, step_keys, idx = starts(keys, pool)
        obs = np.asarray(pool)[np.asarray(idx)].astype(np.float64)  # (S, n, d)
        state = [[sim.state_of(o) for o in seed] for seed in obs]
        alive, columns, valid = np.ones(obs.shape[:2], bool), [], []
        for t in range(k):
            actions = np.asarray(act(actor_params, jnp.asarray(obs, jnp.float32), step_keys[:, t]))
            next_obs, rewards, done = np.zeros_like(obs), np.zeros(obs.shape[:2]), np.zeros(obs.shape[:2], bool)
            for s, i in np.argwhere(alive):
                next_obs[s, i], rewards[s, i], done[s, i], state[s][i] = sim.step(*state[s][i], actions[s, i])
            columns.append((obs, actions, rewards, next_obs, 1.0 - done))
            valid.append(alive.copy())
            alive, obs = alive & ~done, next_obs
        transitions = Transitions(*(jnp.asarray(np.stack(c, 1), jnp.float32) for c in zip(*columns)))  # (S, k, n)
        buffers, stats = add(buffers, transitions, jnp.asarray(np.stack(valid, 1)))
        return buffers, keys, stats

    return rollouts


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
    """Per member: rows in the model buffer, their mean reward and terminal fraction (for the record)."""
    size = np.asarray(buffers.size)
    filled = np.arange(buffers.data.rewards.shape[1])[None] < size[:, None]
    mean = lambda x: ((np.asarray(x) * filled).sum(1) / np.maximum(size, 1)).round(4).tolist()  # noqa: E731
    return {"size": size.tolist(), "reward_mean": mean(buffers.data.rewards),
            "terminal_fraction": mean(1.0 - np.asarray(buffers.data.masks))}  # fmt: skip


def train(args: Args) -> dict:
    data, meta = load_dataset(args.dataset)
    args = resolve(args, meta)
    done_fn, done_name = termination_of(meta)
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
    init_one = jax.jit(init)  # one jitted init per seed, stacked: seed i starts as a single-seed run would
    states = jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *[init_one(k) for k in init_keys])
    states, keys = shard(tile(states, len(points))), shard(tile(keys, len(points)))
    num, k = args.rollouts_per_epoch, args.rollout_length
    buffers = jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *[
        empty_buffer(num * k * args.retain_epochs, meta.obs_dim, meta.action_dim) for _ in seeds])  # fmt: skip
    buffers = shard(tile(buffers, len(points)))  # one model buffer per member, empty
    member, template = DynamicsMember(args.model_hidden_dims, meta.obs_dim + 1), None
    if not args.true_dynamics:
        template = dynamics_template(args, meta.obs_dim, meta.action_dim)
    dynamics, info = None, None
    if args.dynamics_path and not args.resume:  # before the run directory exists: a bad file leaves none
        dynamics, info = load_dynamics(dynamics_file(args.dynamics_path), template, "--dynamics-path")
        if info.get("dataset_fingerprint") != meta.fingerprint:
            print(f"note: the dynamics model was trained on {info.get('dataset')} (another build)", flush=True)
    sim = Simulator(meta) if args.true_dynamics else None

    logger = RunLogger("ravl", args, meta, seeds=seeds, paper_steps=PAPER_STEPS, points=points)
    print(f"RAVL on {args.dataset} ({meta.domain}, {meta.size} transitions): N {args.num_critics}, eta {args.eta}, "
          f"k {k}, dataset ratio {args.dataset_ratio}, termination {done_name}, "
          f"{'true' if sim else 'learnt'} dynamics, {args.eval_episodes} eval episodes"
          + (f"; sweep of {len(points)} points x {len(seeds)} seeds: {' '.join(args.sweep)}" if args.sweep else "")
          + (f"; members sharded over {jax.device_count()} devices" if jax.device_count() > 1 else ""),
          flush=True)  # fmt: skip
    if args.true_dynamics and not logger.resumed:
        logger.record["dynamics"] = {"source": "simulator"}
    elif not args.true_dynamics:
        path, progress = logger.run_dir / DYNAMICS_FILE, logger.run_dir / MODEL_PROGRESS_FILE
        # A run resumed before its model was saved (killed while it trained) trains it on from there.
        if logger.resumed and (path.exists() or args.eval_only or "dynamics" in logger.record):
            dynamics, info = load_dynamics(path, template, "--resume")
        else:
            if dynamics is None:
                if not logger.resumed:  # a checkpoint at step 0: the run can be resumed while its model trains
                    logger.save_checkpoint(states, 0, keys, "offline", online=buffers)
                model_key = jax.random.fold_in(jax.random.key(args.dynamics_seed), MODEL_STREAM)
                dynamics, info = train_dynamics(args, offline, model_key, progress=progress)
                info.update(dataset=meta.dataset_id, dataset_fingerprint=meta.fingerprint, source="trained")
                info.update(obs_dim=meta.obs_dim, action_dim=meta.action_dim, num_models=args.num_models,
                            hidden_dims=list(args.model_hidden_dims), dynamics_seed=args.dynamics_seed)  # fmt: skip
            else:
                info["source"] = str(dynamics_file(args.dynamics_path))
            save_dynamics(path, dynamics, info)
            progress.unlink(missing_ok=True)
            logger.record["dynamics"] = info
    offline, dynamics = replicate(offline), replicate(dynamics)  # shared by every member (and device)
    step = 0
    if logger.resumed:  # the templates are the members' (tiled) states and buffers
        ck = logger.load_checkpoint(states, keys, online_template=buffers)
        states, step, keys, buffers = shard(ck.state), ck.step, shard(ck.rng), shard(ck.online)
        print(f"resumed from step {step}", flush=True)

    @jax.jit
    def policy(actor_params, carry, obs, prev_reward, rng):  # obs: (members, episodes, obs_dim)
        return jax.vmap(lambda p, o: act(p, o, rng, True))(actor_params, obs), carry

    if args.eval_only:
        return logger.loaded(policy, states.actor)
    if sim is None:
        rollouts = make_model_rollouts(sample_action, member, done_fn, num, k)
    else:
        rollouts = make_simulator_rollouts(sample_action, sim, num, k)
    n_real = int(args.dataset_ratio * args.batch_size)
    epoch, chunks = args.updates_per_epoch, {}
    t0, clock = time.time(), PhaseClock(len(members) * num * k)
    logger.progress(args.total_steps, initial=step, desc="offline")
    while step < args.total_steps:
        start, target, chunk_metrics = step, min(step + args.eval_every, args.total_steps), []
        while step < target:
            if step % epoch == 0:  # a round of rollouts starts every epoch
                clock.start(states)
                buffers, keys, stats = rollouts(states.actor, buffers, keys, offline.observations, dynamics)
                stats = jax.device_get(stats)
                clock.stop("rollouts", 1, kept=float(np.sum(stats["rollout/mean_length"])) * num)
                logger.scalars(step, {name: float(np.mean(v)) for name, v in stats.items()})
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
        # The critics' values since the last evaluation, per member: where value learning diverges
        # (the edge-of-reach failure), these grow without bound while the score collapses.
        q = {name: np.round(metrics[f"q_{name}_mean"].mean(1), 3).tolist() for name in ("data", "policy")}
        extra = {"model_buffer": buffer_summary(buffers), "timing": clock.read(), "q_mean": q}
        logger.evaluation(step, result, phase="offline", extra=extra)
        logger.save_checkpoint(states, step, keys, "offline", online=buffers)
    record = logger.close()
    if sim is not None:
        sim.env.close()
    final = record["final"]
    print(f"{args.total_steps} updates ({time.time() - t0:.0f} s in this session); final normalized score "
          f"{final['normalized_mean']:.1f} ± {final['normalized_std']:.1f} (seeds {seeds}); "
          f"record: {logger.run_dir / 'record.json'}", flush=True)  # fmt: skip
    return record


if __name__ == "__main__":
    cli(Args, train, validate=validate)
