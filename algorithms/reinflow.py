"""ReinFlow: Zhang, Yu, Su and Wang, "ReinFlow: Fine-tuning Flow Matching Policy with Online
Reinforcement Learning", NeurIPS 2025. https://arxiv.org/abs/2505.22094

A flow-matching policy maps Gaussian noise to a chunk of Ta = 4 actions (executed open-loop) by K
Euler steps of a learned velocity field v(x, t, s), pre-trained offline by flow-matching behaviour
cloning (rectified flow: x_t = t x1 + (1 - t) x0, regress v on x1 - x0) and fine-tuned online by
PPO. A deterministic flow has no tractable likelihood, so ReinFlow adds a noise network sigma(t, s)
bounded in [sigma_min, sigma_max] that makes the Euler steps a Markov chain,
x_{k+1} ~ N(clip(x_k + v(x_k, t_k, s) / K), sigma_k^2): the log-likelihood of a stored chain
x_0..x_K is exact, and PPO's ratio is taken on it. Evaluation runs the noise-free chain from x_0.

Follows the official code (ReinFlow/ReinFlow: model/flow/{reflow,mlp_flow}.py, model/flow/ft_ppo/
ppoflow.py, agent/finetune/reinflow/train_ppo_flow_agent.py, cfg/gym/...): observations scaled to
[-1, 1] by the data's min and max; chunks of 4 consecutive actions that never cross an episode's end
(a chunk starts at least Ta - 1 steps before its episode's last step, as StitchedSequenceDataset);
FlowMLP (sinusoidal time embedding 16 -> 32 -> Mish -> 16, a pre-activation residual ReLU MLP)
trained by AdamW (1e-3, weight decay 1e-6) with an EMA (decay 0.995, every 10 updates once 20 epochs
have passed, a copy before) from which fine-tuning starts; the noise net (Tanh MLP 64-64 on the
velocity net's detached time embedding and the state, a tanh-squashed log-variance); the chain's
log-likelihood with its initial noise, divided by (K + 1) and Ta * |A| and clamped to [-1, 1] in the
loss; the Euler mean clipped to [-1, 1], samples to 3 sigma, the last one to [-1, 1] (clips the density
ignores, as there); PPO with per-minibatch advantage normalization, clip 0.01, entropy bonus 0.03,
value loss 0.5 (residual Mish critic), 5 epochs of minibatches over the rollout repeated 10 times, the
target-KL stop (once a minibatch's approximate KL exceeds 1.0, the iteration's later minibatches are
skipped), critic warm-up iterations, running reward scaling (std of a running discounted return, clip
+-10), per-chunk GAE (gamma 0.99 per chunk, lambda 0.95) on the chunk's summed reward, AdamW rates on
cosine warm restarts every 100 iterations, and the "learn_decay" noise schedule (sigma_max held for
35% of the iterations, then cosine-annealed to 0.3 sigma_min + 0.7 sigma_max).

Differences, on purpose:
- ONE time grid, t_k = k / K, in pre-training's sampler, rollouts and the log-probability
  recomputation. The official rollout uses linspace(0, 1, K) and a version of its recomputation
  linspace(0, 1 - 1/K, K), so its ratio is not 1 before the first update (ReinFlow issue #5). Here one
  transition function serves both, and the first minibatch's ratio is 1 to float precision (logged as
  `ratio_first_max_dev`, tested).
- GAE stops at a truncation and bootstraps from the true last observation there; the official buffer
  bootstraps a truncated chunk from the next episode's first value.
- Evaluations during fine-tuning run on separate environments (common.evaluation) instead of the
  official validation iterations: there every 10th iteration only evaluates (no update, its schedules
  still stepping) and resets the training environments, so 1000 official iterations hold 900 updates.
- Environment steps are counted as there (num_envs x 4 per chunk, also where an episode ends inside a
  chunk, whose rest is dropped as the official wrapper does).
- Pre-training's rate is constant: the official cosine cycle spans 3000 epochs, of which the released
  checkpoints train 40-80 (within 0.1% of 1e-3 after a first epoch at 1e-4, omitted). Actions are the
  env's Box mapped to [-1, 1] (this repo's convention), not the data's min and max. No separate
  sampling floor on sigma (it equals sigma_min in every config); no BC regularizer (off in the configs).
- Presets per robot come from the official gym fine-tuning configs (hopper, walker2d, halfcheetah,
  ant); other domains have none and use hopper's. The default of 10 environments per seed suits a
  CPU; --num-envs 40 gives the official iteration of 80k steps and its minibatches of 50k. With 10,
  an iteration is 20k steps: minibatches of 12.5k, 4x the gradient steps per environment step, and
  every schedule counted in iterations (learning-rate restarts, critic warm-up, the noise decay)
  spans a quarter of the official environment steps.
- Pre-training runs --total-steps updates on every robot (300k: about hopper's official 40 epochs
  of its data); the official checkpoints train walker2d 80 epochs, ant 50, halfcheetah 1500. The
  EMA starts averaging after --ema-start epochs (the official counter starts at 1, so it starts one
  epoch sooner, and copies only every 10th update before that). Batches of chunks are drawn with
  replacement (the official loader shuffles through each epoch).

    python algorithms/reinflow.py --dataset local/hopper/medium-v0 --total-steps 300000 --online-steps 1000000
    python algorithms/reinflow.py --dataset local/walker2d/medium-v0 --num-envs 40 --num-seeds 3
    python algorithms/reinflow.py --dataset local/hopper/medium-v0 --online-steps 0   # flow BC only
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from common.data import Meta, UserError, load_dataset
from common.evaluation import default_eval_episodes, evaluate
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
    total_steps: int = 300_000
    """flow-matching pre-training updates (~ the official hopper checkpoint: 40 epochs of 1M transitions, batch 128)"""
    online_steps: int = 1_000_000
    """PPO fine-tuning environment steps per seed, whole iterations (0: pre-training only; the paper runs up
    to 1000 iterations of 80k steps); extending it on --resume stretches the noise schedule from then on"""
    eval_every: int = 20_000
    """pre-training updates, or fine-tuning environment steps (at the end of an iteration), between evaluations"""
    eval_episodes: int | None = None
    """evaluation episodes per seed (None: 10 on locomotion, 100 on mazes)"""
    batch_size: int = 128
    """action chunks per pre-training update per seed"""
    hidden_dims: tuple[int, ...] = (512, 512, 512)
    """velocity network: a residual MLP, equal sizes (the official 512 x 3)"""
    # --- Flow policy ---
    chunk_len: int = 4
    """Ta: actions per chunk, executed open-loop"""
    denoising_steps: int = 4
    """K: Euler steps from noise to a chunk, with one time grid t_k = k / K everywhere (1 allowed)"""
    learning_rate: float = 1e-3
    """pre-training AdamW learning rate (constant)"""
    weight_decay: float = 1e-6
    """pre-training AdamW weight decay"""
    ema_decay: float = 0.995
    """decay of the velocity net's EMA, which evaluations during pre-training and fine-tuning start from"""
    ema_every: int = 10
    """pre-training updates between EMA updates"""
    ema_start: float = 20.0
    """epochs of the data's chunks before the EMA starts averaging (until then it copies the weights)"""
    # --- Fine-tuning (PPO) ---
    num_envs: int = 10
    """training environments per seed (official 40)"""
    rollout_chunks: int = 500
    """chunks each environment runs per PPO iteration (an iteration: num_envs x rollout_chunks x chunk_len steps)"""
    update_epochs: int = 5
    """passes over the rollout per iteration"""
    num_minibatches: int = 4
    """minibatches per pass (official: 200k repeated samples in minibatches of 50k)"""
    repeat_samples: int = 10
    """each pass draws its minibatches from the rollout repeated this many times (official repeat_samples)"""
    discount: float = 0.99
    """discount per chunk"""
    gae_lambda: float = 0.95
    """GAE lambda"""
    clip_coef: float = 0.01
    """PPO ratio clip epsilon"""
    ent_coef: float = 0.03
    """entropy bonus on the normalized chain entropy"""
    vf_coef: float = 0.5
    """value loss coefficient"""
    target_kl: float = 1.0
    """skip the iteration's remaining minibatches once a minibatch's approximate KL exceeds this"""
    actor_lr: float | None = None
    """peak AdamW learning rate of the velocity and noise nets (None: preset)"""
    actor_min_lr: float | None = None
    """floor of the actor's cosine schedule (None: preset)"""
    critic_lr: float | None = None
    """peak AdamW learning rate of the critic (None: preset)"""
    critic_min_lr: float | None = None
    """floor of the critic's cosine schedule (None: preset)"""
    critic_weight_decay: float | None = None
    """critic AdamW weight decay (None: preset); the actor has none"""
    critic_warmup_iters: int | None = None
    """first iterations that train the critic only (None: preset)"""
    sigma_min: float | None = None
    """lower bound of the noise net's std (None: preset)"""
    sigma_max: float | None = None
    """initial upper bound of the noise net's std (None: preset)"""
    noise_hold: float = 0.35
    """fraction of the iterations before sigma_max starts its cosine decay"""
    noise_decay: float = 0.7
    """sigma_max decays to sigma_min + noise_decay * (sigma_max - sigma_min)"""
    critic_hidden_dims: tuple[int, ...] = (256, 256, 256)
    """critic: a residual Mish MLP, equal sizes"""
    noise_hidden_dims: tuple[int, ...] = (64, 64)
    """noise net: a Tanh MLP"""
    sweep: tuple[str, ...] = ()
    """hyperparameter grid trained with the seeds as one program, e.g. --sweep clip-coef=0.01,0.05 ent-coef=0,0.03"""


# Presets from the official fine-tuning configs (cfg/gym/finetune/<robot>/ft_ppo_reflow_mlp.yaml).
HOPPER = dict(actor_lr=4.5e-5, actor_min_lr=2e-5, critic_lr=6.5e-4, critic_min_lr=3e-4, critic_weight_decay=1e-5,
              critic_warmup_iters=0, sigma_min=0.10, sigma_max=0.24)  # fmt: skip
# No official gym values outside locomotion: the hopper preset.
PRESETS = {domain: HOPPER for domain in ("locomotion", "antmaze", "pointmaze", "adroit", "kitchen")}
# Refinements per robot (every level: the configs are per robot) or (robot, level).
DATASET_PRESETS: dict[str | tuple[str, str], dict] = {
    "walker2d": dict(actor_lr=4e-4, actor_min_lr=4e-4, critic_lr=4e-3, critic_min_lr=4e-3, critic_warmup_iters=5),
    "halfcheetah": dict(actor_lr=3e-5, actor_min_lr=1.5e-5, critic_lr=3e-4, critic_min_lr=1.5e-4,
                        critic_weight_decay=1e-4, critic_warmup_iters=10),
    "ant": dict(sigma_min=0.08, sigma_max=0.16),
}  # fmt: skip
TIME_DIM = 16  # FlowMLP's time embedding
RANDN_CLIP = 3.0  # samples stay within 3 sigma of the Euler mean
LOGPROB_MIN, LOGPROB_MAX = -1.0, 1.0  # normalized log-probabilities are clamped in the PPO loss
REWARD_CLIP = 10.0  # scaled rewards
LR_CYCLE, LR_WARMUP = 100, 10  # iterations: CosineAnnealingWarmupRestarts of the fine-tuning configs
PAPER_STEPS = (300_000, 80_000_000)
# The traced hyperparameters (Hyper); not sigma_min, which also sets the host-side noise schedule.
SWEEPABLE = ("learning_rate", "weight_decay", "ema_decay", "discount", "gae_lambda", "clip_coef", "ent_coef",
             "vf_coef", "target_kl", "critic_weight_decay")  # fmt: skip


def resolve(args: Args, meta: Meta) -> Args:
    """Fill the None fields from the dataset's preset (domain, then robot, then robot and level); an
    explicit flag always wins."""
    preset = {**PRESETS[meta.domain], **DATASET_PRESETS.get(meta.robot, {}),
              **DATASET_PRESETS.get((meta.robot, meta.level), {})}  # fmt: skip
    preset["eval_episodes"] = default_eval_episodes(meta.domain)
    args = dataclasses.replace(args, **{k: v for k, v in preset.items() if getattr(args, k) is None})
    validate(args)  # a flag given alone may cross the other end's preset
    return args


def validate(args: Args) -> None:
    """ReinFlow's own flags, checked before anything loads (common's cli checks the shared ones), with
    each --sweep point's values."""
    for point in sweep_points(args.sweep, args, SWEEPABLE):
        check(dataclasses.replace(args, **point))


def check(args: Args) -> None:
    positive = ("chunk_len", "denoising_steps", "ema_every", "num_envs", "rollout_chunks", "update_epochs",
                "num_minibatches", "repeat_samples", "learning_rate", "clip_coef", "actor_lr", "critic_lr")  # fmt: skip
    for name in positive:
        value = getattr(args, name)
        if value is not None and not value > 0:
            raise UserError(f"--{name.replace('_', '-')} must be positive, got {value}")
    samples = args.num_envs * args.rollout_chunks * args.repeat_samples
    checks = [
        (2 * args.num_minibatches <= samples, f"--num-minibatches {args.num_minibatches} leaves fewer than 2 of "
                                              f"the {samples} samples (envs x chunks x repeats) to a minibatch"),
        (0.0 <= args.ema_decay < 1.0, f"--ema-decay must be in [0, 1), got {args.ema_decay}"),
        (0.0 < args.discount <= 1.0, f"--discount must be in (0, 1], got {args.discount}"),
        (0.0 <= args.gae_lambda <= 1.0, f"--gae-lambda must be in [0, 1], got {args.gae_lambda}"),
        (0.0 <= args.noise_hold <= 1.0 and 0.0 <= args.noise_decay <= 1.0, "--noise-hold and --noise-decay are "
                                                                             "fractions in [0, 1]"),
        (args.sigma_min is None or args.sigma_min > 0, f"--sigma-min must be positive, got {args.sigma_min}"),
        (args.sigma_min is None or args.sigma_max is None or args.sigma_min < args.sigma_max,
         f"--sigma-min ({args.sigma_min}) must be below --sigma-max ({args.sigma_max})"),
        (args.critic_warmup_iters is None or args.critic_warmup_iters >= 0, "--critic-warmup-iters must be 0 or more"),
    ]  # fmt: skip
    for name in ("hidden_dims", "critic_hidden_dims"):
        dims = getattr(args, name)
        checks.append((len(set(dims)) <= 1, f"--{name.replace('_', '-')} {' '.join(map(str, dims))}: a residual "
                                            "MLP needs equal sizes, e.g. 512 512 512"))  # fmt: skip
    for ok, message in checks:
        if not ok:
            raise UserError(message)


# --- Networks ---------------------------------------------------------------------------------
def torch_init():
    """torch.nn.Linear's default kernel init, U(+-1/sqrt(fan_in)) (biases start at zero here)."""
    return nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform")


def mish(x):
    return x * jnp.tanh(jax.nn.softplus(x))


def sinusoidal_embedding(t: jax.Array, dim: int = TIME_DIM) -> jax.Array:
    """t (...,) in [0, 1] -> (..., dim): sin and cos of t times frequencies 1 .. 1e-4 (DPPO's SinusoidalPosEmb)."""
    half = dim // 2
    freqs = jnp.exp(jnp.arange(half) * -(math.log(10_000.0) / (half - 1)))
    arg = t[..., None] * freqs
    return jnp.concatenate([jnp.sin(arg), jnp.cos(arg)], -1)


class ResidualMLP(nn.Module):
    """Dense, then pre-activation blocks x + W2 act(W1 act(x)), then Dense out (DPPO's ResidualMLP);
    a leftover odd layer is a plain pre-activated Dense."""

    dims: tuple[int, ...]
    out_dim: int
    activation: str = "relu"

    @nn.compact
    def __call__(self, x):
        act = nn.relu if self.activation == "relu" else mish
        h = nn.Dense(self.dims[0], kernel_init=torch_init())(x)
        rest = self.dims[1:]
        for i in range(0, len(rest) - 1, 2):
            y = nn.Dense(rest[i], kernel_init=torch_init())(act(h))
            h = h + nn.Dense(rest[i + 1], kernel_init=torch_init())(act(y))
        if len(rest) % 2:
            h = nn.Dense(rest[-1], kernel_init=torch_init())(act(h))
        return nn.Dense(self.out_dim, kernel_init=torch_init())(h)


class VelocityNet(nn.Module):
    """v(x_t, t, s) on a flat chunk x (..., Ta * |A|); also returns the time embedding (the noise net's input)."""

    hidden_dims: tuple[int, ...]
    chunk_dim: int

    @nn.compact
    def __call__(self, x, t, obs):
        emb = nn.Dense(2 * TIME_DIM, kernel_init=torch_init())(sinusoidal_embedding(t))
        emb = nn.Dense(TIME_DIM, kernel_init=torch_init())(mish(emb))
        v = ResidualMLP(self.hidden_dims, self.chunk_dim, "relu")(jnp.concatenate([x, emb, obs], -1))
        return v, emb


class NoiseNet(nn.Module):
    """Raw log-variance logits of the per-step noise, from the time embedding and the state."""

    hidden_dims: tuple[int, ...]
    chunk_dim: int

    @nn.compact
    def __call__(self, time_emb, obs):
        h = jnp.concatenate([time_emb, obs], -1)
        for d in self.hidden_dims:
            h = jnp.tanh(nn.Dense(d, kernel_init=torch_init())(h))
        return nn.Dense(self.chunk_dim, kernel_init=torch_init())(h)


class Critic(nn.Module):
    hidden_dims: tuple[int, ...]

    @nn.compact
    def __call__(self, obs):
        return ResidualMLP(self.hidden_dims, 1, "mish")(obs)[..., 0]


class RewardScaler(NamedTuple):
    """Running statistics of the discounted return, per seed (DPPO's RunningRewardScaler)."""

    ret: jax.Array  # (num_envs,) running discounted return
    done: jax.Array  # (num_envs,) 1.0 where the last chunk ended an episode
    mean: jax.Array
    var: jax.Array
    count: jax.Array


class TrainState(NamedTuple):
    """Everything one seed trains, in both phases."""

    velocity: dict  # the flow's velocity net: pre-trained, then fine-tuned from the EMA
    ema: dict  # EMA of the velocity net during pre-training
    noise: dict  # the noise net (fine-tuning only)
    critic: dict
    pretrain_opt: optax.OptState
    actor_opt: optax.OptState  # (velocity, noise) during fine-tuning
    critic_opt: optax.OptState
    step: jax.Array  # int32, pre-training updates done
    scaler: RewardScaler


class Hyper(NamedTuple):
    """Numeric hyperparameters that do not change shapes, as float32 arrays (vmappable)."""

    learning_rate: jax.Array
    weight_decay: jax.Array
    ema_decay: jax.Array
    discount: jax.Array
    gae_lambda: jax.Array
    clip_coef: jax.Array
    ent_coef: jax.Array
    vf_coef: jax.Array
    target_kl: jax.Array
    sigma_min: jax.Array
    critic_weight_decay: jax.Array


class Schedule(NamedTuple):
    """What changes from one PPO iteration to the next (host-computed, float32)."""

    actor_lr: jax.Array
    critic_lr: jax.Array
    sigma_max: jax.Array
    train_actor: jax.Array  # 0.0 during the critic warm-up


class Rollout(NamedTuple):
    """One iteration of one seed, (chunks, num_envs, ...)."""

    observations: jax.Array  # raw
    chains: jax.Array  # (T, E, K + 1, Ta * |A|): x_0 .. x_K, x_K the executed chunk
    log_probs: jax.Array  # normalized, as sampled
    rewards: jax.Array  # sum of the chunk's rewards
    terminals: jax.Array
    truncations: jax.Array
    next_observations: jax.Array  # raw true next observations (the last one before a reset)


class Minibatch(NamedTuple):
    observations: jax.Array  # normalized
    chains: jax.Array
    log_probs: jax.Array
    advantages: jax.Array
    returns: jax.Array


# --- The signature terms ------------------------------------------------------------------------
def time_grid(num_steps: int) -> jax.Array:
    """t_k = k / K, k = 0..K-1: the Euler grid of x_{k+1} = x_k + v(x_k, t_k) / K, used by every sampler
    and by the log-probability recomputation."""
    return jnp.arange(num_steps, dtype=jnp.float32) / num_steps


def bounded_sigma(raw: jax.Array, sigma_min, sigma_max) -> jax.Array:
    """tanh-squashed log-variance between log sigma_min^2 and log sigma_max^2 (official ExploreNoiseNet),
    clipped so that rounding never leaves the bounds."""
    lo, hi = 2.0 * jnp.log(sigma_min), 2.0 * jnp.log(sigma_max)
    log_var = lo + (hi - lo) * (jnp.tanh(raw) + 1.0) / 2.0
    return jnp.clip(jnp.exp(0.5 * log_var), sigma_min, sigma_max)


def normal_log_prob(x, mean, std):
    return -0.5 * ((x - mean) / std) ** 2 - jnp.log(std) - 0.5 * jnp.log(2.0 * jnp.pi)


def gae(rewards, values, next_values, terminals, truncations, discount, lam):
    """Per-chunk GAE over (T, E): bootstrap unless terminal; the recursion stops at any episode end
    (a truncation bootstraps from its true last observation's value). Returns (advantages, returns)."""
    deltas = rewards + discount * (1.0 - terminals) * next_values - values
    continues = 1.0 - jnp.maximum(terminals, truncations)

    def body(next_adv, x):
        delta, cont = x
        adv = delta + discount * lam * cont * next_adv
        return adv, adv

    _, adv = jax.lax.scan(body, jnp.zeros_like(values[0]), (deltas, continues), reverse=True)
    return adv, adv + values


def scale_rewards(scaler: RewardScaler, rewards, dones, discount):
    """Divide (T, E) rewards by the running std of the discounted return (updated with this
    iteration's returns first), clip to +-10; the return restarts where an episode did."""
    firsts = jnp.concatenate([scaler.done[None], dones[:-1]])

    def body(ret, x):
        r, first = x
        ret = r + (1.0 - first) * discount * ret
        return ret, ret

    last, rets = jax.lax.scan(body, scaler.ret, (rewards, firsts))
    n, batch_mean, batch_var = rets.size, rets.mean(), rets.var()
    delta, total = batch_mean - scaler.mean, scaler.count + n
    mean = scaler.mean + delta * n / total
    var = (scaler.var * scaler.count + batch_var * n + delta**2 * scaler.count * n / total) / (total - 1)
    scaled = jnp.clip(rewards / jnp.sqrt(var + 1e-8), -REWARD_CLIP, REWARD_CLIP)
    return scaled, RewardScaler(last, dones[-1], mean, var, total)


def iteration_schedule(it: int, num_iters: int, args: Args) -> Schedule:
    """Learning rates (cosine warm restarts every 100 iterations, the actor's counted from the end of the
    critic warm-up) and the noise's upper bound for iteration `it` (0-based), as the official code sets
    them after each iteration."""

    def cosine(i, peak, floor):
        s = i % LR_CYCLE
        if s < LR_WARMUP:
            return floor + (peak - floor) * s / LR_WARMUP
        return floor + (peak - floor) * (1 + math.cos(math.pi * (s - LR_WARMUP) / (LR_CYCLE - LR_WARMUP))) / 2

    hold, anneal = int(num_iters * args.noise_hold), max(1, int(num_iters * (1 - args.noise_hold)))
    floor = args.sigma_min * (1 - args.noise_decay) + args.sigma_max * args.noise_decay
    x = max(it - 1, 0)  # iteration it uses the bound set after iteration it - 1
    sigma_max = floor + (args.sigma_max - floor) * 0.5 * (1 + math.cos(min(max((x - hold) / anneal, 0), 1) * math.pi))
    warm = args.critic_warmup_iters
    actor_lr = cosine(max(it - warm, 0), args.actor_lr, args.actor_min_lr)
    critic_lr = cosine(it, args.critic_lr, args.critic_min_lr)
    return Schedule(*map(np.float32, (actor_lr, critic_lr, sigma_max, it >= warm)))


def tree_where(cond, new, old):
    return jax.tree_util.tree_map(lambda a, b: jnp.where(cond, a, b), new, old)


def make_agent(args: Args, obs_dim: int, action_dim: int, num_chunks: int = 1):
    """init, the two updates and the samplers for one seed, closed over the (static) architecture;
    `num_chunks` (the offline data's) sets when the EMA starts."""
    K, D = args.denoising_steps, args.chunk_len * action_dim
    velocity_net, noise_net = VelocityNet(args.hidden_dims, D), NoiseNet(args.noise_hidden_dims, D)
    critic_net = Critic(args.critic_hidden_dims)
    ema_start = int(round(args.ema_start * max(1, num_chunks // args.batch_size)))
    pretrain_tx = lambda hp: optax.adamw(hp.learning_rate, weight_decay=hp.weight_decay)  # noqa: E731

    def init(key) -> TrainState:
        k_vel, k_noise, k_critic = jax.random.split(key, 3)
        obs = jnp.zeros((1, obs_dim))
        velocity = velocity_net.init(k_vel, jnp.zeros((1, D)), jnp.zeros(1), obs)
        noise = noise_net.init(k_noise, jnp.zeros((1, TIME_DIM)), obs)
        critic = critic_net.init(k_critic, obs)
        tx = optax.adamw(1.0)  # the state's structure only: rates are arrays given at every update
        scaler = RewardScaler(jnp.zeros(args.num_envs), jnp.ones(args.num_envs), jnp.float32(0), jnp.float32(1),
                              jnp.float32(1e-4))  # fmt: skip
        return TrainState(velocity, jax.tree_util.tree_map(jnp.copy, velocity), noise, critic, tx.init(velocity),
                          tx.init((velocity, noise)), tx.init(critic), jnp.int32(0), scaler)  # fmt: skip

    # --- the Markov chain: one transition function for sampling and for the recomputation ---
    def euler_mean(velocity, x, t, obs):
        v, emb = velocity_net.apply(velocity, x, t, obs)
        return jnp.clip(x + v / K, -1.0, 1.0), emb

    def transition(actor, x, t, obs, sigma_max, hp: Hyper):
        """(mean, std) of x_{k+1} given x_k at time t: N(clip(x + v / K), sigma(t, s)^2)."""
        velocity, noise = actor
        mu, emb = euler_mean(velocity, x, t, obs)
        sigma = bounded_sigma(noise_net.apply(noise, jax.lax.stop_gradient(emb), obs), hp.sigma_min, sigma_max)
        return mu, sigma

    def sample_chain(actor, obs, key, sigma_max, hp: Hyper, times):
        """obs (B, obs_dim) normalized -> chain (B, K + 1, D) and its normalized log-probability (B,)."""
        k0, k_eps = jax.random.split(key)
        x0 = jax.random.normal(k0, (obs.shape[0], D))
        eps = jnp.clip(jax.random.normal(k_eps, (K, obs.shape[0], D)), -RANDN_CLIP, RANDN_CLIP)

        def step(x, inputs):
            k, t, e = inputs
            mu, sigma = transition(actor, x, jnp.full(x.shape[:1], t), obs, sigma_max, hp)
            x_next = mu + sigma * e
            x_next = jnp.where(k == K - 1, jnp.clip(x_next, -1.0, 1.0), x_next)
            return x_next, (x_next, normal_log_prob(x_next, mu, sigma).sum(-1))

        _, (xs, log_probs) = jax.lax.scan(step, x0, (jnp.arange(K), times, eps))
        chain = jnp.concatenate([x0[None], xs]).transpose(1, 0, 2)
        log_prob = (normal_log_prob(x0, 0.0, 1.0).sum(-1) + log_probs.sum(0)) / ((K + 1) * D)
        return chain, log_prob

    def chain_log_prob(actor, obs, chain, sigma_max, hp: Hyper, times):
        """The normalized log-probability (B,) of stored chains (B, K + 1, D), all K transitions at once,
        with the normalized entropy of the transitions (B,) and the mean sigma."""
        x_prev, x_next = chain[:, :-1], chain[:, 1:]
        obs_k = jnp.broadcast_to(obs[:, None], (obs.shape[0], K, obs.shape[-1]))
        mu, sigma = transition(actor, x_prev, jnp.broadcast_to(times, x_prev.shape[:2]), obs_k, sigma_max, hp)
        log_prob = normal_log_prob(chain[:, 0], 0.0, 1.0).sum(-1) + normal_log_prob(x_next, mu, sigma).sum((1, 2))
        half_log_2pie = 0.5 * jnp.log(2.0 * jnp.pi * jnp.e)
        entropy = (D * half_log_2pie + (half_log_2pie + jnp.log(sigma)).sum((1, 2))) / ((K + 1) * D)
        return log_prob / ((K + 1) * D), entropy, sigma.mean()

    def denoise(velocity, obs, key, times):
        """The noise-free chain (evaluation): x_0 ~ N(0, I), x_{k+1} = clip(x_k + v / K, -1, 1)."""
        x = jax.random.normal(key, (obs.shape[0], D))
        x, _ = jax.lax.scan(lambda x, t: (euler_mean(velocity, x, jnp.full(x.shape[:1], t), obs)[0], None), x, times)
        return x

    # --- losses ---
    def flow_matching_loss(velocity, obs, chunks, key):
        """Rectified flow: x_t = t x1 + (1 - t) x0 with x0 ~ N(0, I), t ~ U[0, 1]; MSE of v to x1 - x0."""
        k_x0, k_t = jax.random.split(key)
        x0 = jax.random.normal(k_x0, chunks.shape)
        t = jax.random.uniform(k_t, chunks.shape[:1])
        v, _ = velocity_net.apply(velocity, t[:, None] * chunks + (1 - t[:, None]) * x0, t, obs)
        loss = ((v - (chunks - x0)) ** 2).mean()
        return loss, {"flow_loss": loss}

    def policy_loss(actor, batch: Minibatch, sigma_max, hp: Hyper):
        """PPO's clipped surrogate on clamped normalized chain log-probabilities, minus the entropy bonus."""
        new, entropy, sigma_mean = chain_log_prob(actor, batch.observations, batch.chains, sigma_max, hp, time_grid(K))
        log_ratio = jnp.clip(new, LOGPROB_MIN, LOGPROB_MAX) - jnp.clip(batch.log_probs, LOGPROB_MIN, LOGPROB_MAX)
        ratio = jnp.exp(log_ratio)
        adv = (batch.advantages - batch.advantages.mean()) / (batch.advantages.std(ddof=1) + 1e-8)
        pg = jnp.maximum(-adv * ratio, -adv * jnp.clip(ratio, 1 - hp.clip_coef, 1 + hp.clip_coef)).mean()
        loss = pg - hp.ent_coef * entropy.mean()
        stats = jax.lax.stop_gradient({"policy_loss": pg, "entropy": entropy.mean(), "sigma_mean": sigma_mean,
                                       "approx_kl": ((ratio - 1) - log_ratio).mean(),
                                       "clipfrac": (jnp.abs(ratio - 1) > hp.clip_coef).mean(),
                                       "ratio_max_dev": jnp.abs(ratio - 1).max()})  # fmt: skip
        return loss, stats

    def value_loss(critic, batch: Minibatch, hp: Hyper):
        v_loss = 0.5 * ((critic_net.apply(critic, batch.observations) - batch.returns) ** 2).mean()
        return hp.vf_coef * v_loss, {"value_loss": v_loss}

    # --- updates ---
    def pretrain_update(s: TrainState, obs, chunks, key, hp: Hyper):
        (_, metrics), grads = jax.value_and_grad(flow_matching_loss, has_aux=True)(s.velocity, obs, chunks, key)
        updates, opt = pretrain_tx(hp).update(grads, s.pretrain_opt, s.velocity)
        velocity = optax.apply_updates(s.velocity, updates)
        averaged = optax.incremental_update(velocity, s.ema, 1.0 - hp.ema_decay)
        ema = tree_where(s.step < ema_start, velocity, tree_where(s.step % args.ema_every == 0, averaged, s.ema))
        return s._replace(velocity=velocity, ema=ema, pretrain_opt=opt, step=s.step + 1), metrics

    def ppo_update(s: TrainState, ro: Rollout, key, hp: Hyper, sched: Schedule, normalize):
        """One PPO iteration on one seed's rollout: reward scaling, GAE, then epochs of minibatches."""
        obs, next_obs = normalize(ro.observations), normalize(ro.next_observations)
        rewards, scaler = scale_rewards(s.scaler, ro.rewards, jnp.maximum(ro.terminals, ro.truncations), hp.discount)
        values, next_values = critic_net.apply(s.critic, obs), critic_net.apply(s.critic, next_obs)
        adv, returns = gae(rewards, values, next_values, ro.terminals, ro.truncations, hp.discount, hp.gae_lambda)
        n = values.size
        flat = Minibatch(obs.reshape(n, -1), ro.chains.reshape(n, K + 1, D), ro.log_probs.reshape(n),
                         adv.reshape(n), returns.reshape(n))  # fmt: skip
        size = n * args.repeat_samples // args.num_minibatches
        perms = jax.vmap(lambda k: jax.random.permutation(k, n * args.repeat_samples))(
            jax.random.split(key, args.update_epochs)
        )
        batches = perms[:, : size * args.num_minibatches].reshape(-1, size) // args.repeat_samples
        actor_tx = optax.adamw(sched.actor_lr, weight_decay=0.0)
        critic_tx = optax.adamw(sched.critic_lr, weight_decay=hp.critic_weight_decay)

        def body(carry, idx):
            actor, critic, actor_opt, critic_opt, last_kl = carry
            skip = last_kl > hp.target_kl  # the official check, before each minibatch
            batch = jax.tree_util.tree_map(lambda x: x[idx], flat)
            grads, m_pi = jax.grad(policy_loss, has_aux=True)(actor, batch, sched.sigma_max, hp)
            updates, new_actor_opt = actor_tx.update(grads, actor_opt, actor)
            train_actor = (sched.train_actor > 0) & ~skip
            actor, actor_opt = tree_where(train_actor, (optax.apply_updates(actor, updates), new_actor_opt),
                                          (actor, actor_opt))  # fmt: skip
            grads, m_v = jax.grad(value_loss, has_aux=True)(critic, batch, hp)
            updates, new_critic_opt = critic_tx.update(grads, critic_opt, critic)
            critic, critic_opt = tree_where(~skip, (optax.apply_updates(critic, updates), new_critic_opt),
                                            (critic, critic_opt))  # fmt: skip
            last_kl = jnp.where(skip, last_kl, m_pi["approx_kl"])
            return (actor, critic, actor_opt, critic_opt, last_kl), {**m_pi, **m_v, "done": 1.0 - skip}

        carry = ((s.velocity, s.noise), s.critic, s.actor_opt, s.critic_opt, jnp.float32(0.0))
        ((velocity, noise), critic, actor_opt, critic_opt, _), ms = jax.lax.scan(body, carry, batches)
        done = ms.pop("done")
        metrics = {k: (v * done).sum() / jnp.maximum(done.sum(), 1.0) for k, v in ms.items()}
        metrics.update(ratio_first_max_dev=ms["ratio_max_dev"][0], minibatches_done=done.sum(),
                       explained_variance=1.0 - jnp.var(returns - values) / jnp.maximum(jnp.var(returns), 1e-8),
                       scaled_reward_mean=rewards.mean(), **sched._asdict())  # fmt: skip
        state = s._replace(velocity=velocity, noise=noise, critic=critic, actor_opt=actor_opt, critic_opt=critic_opt,
                           scaler=scaler)  # fmt: skip
        return state, metrics

    parts = dict(flow_matching_loss=flow_matching_loss, policy_loss=policy_loss, value_loss=value_loss,
                 transition=transition, sample_chain=sample_chain, chain_log_prob=chain_log_prob,
                 denoise=denoise)  # fmt: skip
    return init, pretrain_update, ppo_update, parts


# --- Data -------------------------------------------------------------------------------------
class ChunkData(NamedTuple):
    observations: jax.Array  # (N, obs_dim) normalized
    actions: jax.Array  # (N, |A|)
    starts: jax.Array  # (M,) int32: transitions that begin a chunk inside their episode


def obs_normalizer(observations: np.ndarray):
    """s -> 2 ((s - min) / (max - min + 1e-6) - 0.5), with the data's min and max (the official wrapper)."""
    lo, hi = jnp.asarray(observations.min(0)), jnp.asarray(observations.max(0))
    return lambda obs: 2.0 * ((obs - lo) / (hi - lo + 1e-6) - 0.5)


def chunk_starts(episode_starts: np.ndarray, chunk_len: int) -> np.ndarray:
    """Indices i whose chunk i .. i + Ta - 1 lies inside i's episode."""
    ep = np.cumsum(episode_starts) - 1
    bounds = np.append(np.flatnonzero(episode_starts), len(episode_starts))
    return np.flatnonzero(np.arange(len(episode_starts)) + chunk_len <= bounds[ep + 1]).astype(np.int32)


def make_pretrain_chunk(update, batch_size: int, chunk_len: int, num_updates: int):
    """A jitted scan of `num_updates` pre-training updates, vmapped over members; chunks drawn inside the scan."""

    def one_seed(state, key, data: ChunkData, hp):
        def body(carry, _):
            state, key = carry
            key, k_idx, k_update = jax.random.split(key, 3)
            i = data.starts[jax.random.randint(k_idx, (batch_size,), 0, data.starts.shape[0])]
            chunks = data.actions[i[:, None] + jnp.arange(chunk_len)].reshape(batch_size, -1)
            state, metrics = update(state, data.observations[i], chunks, k_update, hp)
            return (state, key), metrics

        (state, key), metrics = jax.lax.scan(body, (state, key), None, length=num_updates)
        return state, key, metrics

    # hp per member: the sweep's values are traced
    return jax.jit(vmap_members(one_seed, in_axes=(0, 0, None, 0)), donate_argnums=(0,))


# --- Environments -----------------------------------------------------------------------------
class ChunkEnvs:
    """The training environments of every seed, stepped a chunk at a time as the official MultiStep
    wrapper does: a chunk runs open-loop until its episode ends (the rest is dropped), its reward is the
    sum, and an ended episode resets at once. Resumable exactly: a reset draws the same random numbers
    whatever came before it and MuJoCo is deterministic, so a checkpoint keeps, per environment, how
    many times it was reset and the chunks of its running episode (not every chunk since the start:
    80M steps at the paper's budget), and a resumed run resets and replays them."""

    def __init__(self, meta: Meta, reset_seeds: list[int]):
        self.meta, self.reset_seeds = meta, list(reset_seeds)
        self.envs = [meta.make_env() for _ in reset_seeds]
        self.resets = np.zeros(len(reset_seeds), np.int64)  # resets after the seeded one
        self.running: list[list[np.ndarray]] = [[] for _ in reset_seeds]  # each env's chunks since its reset
        self.obs: np.ndarray | None = None

    def reset(self) -> np.ndarray:
        self.resets[:], self.running = 0, [[] for _ in self.envs]
        self.obs = np.stack([self.meta.flatten_obs(e.reset(seed=s)[0]) for e, s in zip(self.envs, self.reset_seeds)])
        return self.obs

    def step(self, chunks: np.ndarray):
        """chunks (num_envs, Ta, |A|) in [-1, 1] -> (obs, reward, terminated, truncated, true_next)."""
        chunks = np.asarray(chunks, np.float32)
        env_actions = self.meta.to_env_action(chunks.reshape(-1, chunks.shape[-1])).reshape(chunks.shape)
        n = len(self.envs)
        obs, true_next = [None] * n, [None] * n
        reward, term, trunc = np.zeros(n), np.zeros(n, bool), np.zeros(n, bool)
        for i, env in enumerate(self.envs):
            self.running[i].append(chunks[i])
            for action in env_actions[i]:
                o, r, term[i], trunc[i], _ = env.step(action)
                reward[i] += r
                if term[i] or trunc[i]:
                    break
            true_next[i] = obs[i] = self.meta.flatten_obs(o)
            if term[i] or trunc[i]:
                obs[i] = self.meta.flatten_obs(env.reset()[0])
                self.resets[i] += 1
                self.running[i] = []
        self.obs = np.stack(obs)
        return self.obs, reward, term, trunc, np.stack(true_next)

    def state(self) -> dict:
        """Per environment: its resets, the chunks of its running episode (zero-padded) and their count,
        and the current observations (a resumed run checks it rebuilt them)."""
        n, longest = len(self.envs), max(1, *map(len, self.running))
        shape = next((c.shape for r in self.running for c in r), (1, 1))
        running = np.zeros((n, longest, *shape), np.float32)
        for i, r in enumerate(self.running):
            if r:
                running[i, : len(r)] = r
        return {"env_resets": self.resets.copy(), "env_running": running,
                "env_running_len": np.array(list(map(len, self.running)), np.int64), "env_obs": self.obs}  # fmt: skip

    def restore(self, state: dict) -> np.ndarray:
        self.reset()
        if "env_chunks" in state:  # a checkpoint of every chunk (written before the running episodes were kept)
            for chunks in np.asarray(state["env_chunks"], np.float32):
                self.step(chunks)
            return self.obs
        for i, env in enumerate(self.envs):
            for _ in range(int(state["env_resets"][i])):
                self.obs[i] = self.meta.flatten_obs(env.reset()[0])
            self.resets[i] = state["env_resets"][i]
            for chunk in np.asarray(state["env_running"][i, : int(state["env_running_len"][i])], np.float32):
                self.running[i].append(chunk)
                for action in self.meta.to_env_action(chunk):
                    self.obs[i] = self.meta.flatten_obs(env.step(action)[0])
        if not np.array_equal(self.obs, state["env_obs"]):
            raise RuntimeError("the resumed environments do not match the checkpoint's observations")
        return self.obs

    def close(self) -> None:
        for env in self.envs:
            env.close()


# --- Online fine-tuning -----------------------------------------------------------------------
def online_phase(args, meta, states, keys, agent, hp, normalize, logger, evaluate_all, seeds, ck=None):
    """PPO fine-tuning from `states` (or continued from the checkpoint `ck` of an online phase); `seeds`
    names the members (seeds, times the sweep's points), --num-envs environments each."""
    _, _, ppo_update, parts = agent
    S, E, T, K = len(seeds), args.num_envs, args.rollout_chunks, args.denoising_steps
    per_iter = E * T * args.chunk_len
    num_iters = -(-args.online_steps // per_iter)
    # Member m runs the environments of its seed args.seed + m % num_seeds, reset as a plain run's.
    envs = ChunkEnvs(meta, [1000 + (args.seed + m % args.num_seeds) * E + j for m in range(S) for j in range(E)])

    def explore(velocity, noise, obs, key, sigma_max, hp):  # one member: obs (E, obs_dim)
        key, k = jax.random.split(key)
        chain, log_prob = parts["sample_chain"]((velocity, noise), normalize(obs), k, sigma_max, hp, time_grid(K))
        return chain, log_prob, key

    explore_all = jax.jit(vmap_members(explore, in_axes=(0, 0, 0, 0, None, 0)))

    def update(state, rollout, key, sched, hp):
        key, k = jax.random.split(key)
        state, metrics = ppo_update(state, rollout, k, hp, sched, normalize)
        return state, key, metrics

    update_all = jax.jit(vmap_members(update, in_axes=(0, 0, 0, None, 0)), donate_argnums=(0,))
    if ck is None:
        it, obs = 0, envs.reset()
    else:  # the environments replayed to the checkpoint's iteration
        it, obs = ck.step // per_iter, envs.restore(ck.host)
    print(f"online: {num_iters} PPO iterations of {per_iter} environment steps per seed ({E} environments x "
          f"{T} chunks x {args.chunk_len} actions)", flush=True)  # fmt: skip
    logger.progress(num_iters * per_iter, initial=it * per_iter, desc="online")
    shape = (T, S, E)
    since_eval, steps_since = 0.0, 0
    while it < num_iters:
        sched = iteration_schedule(it, num_iters, args)
        buf = {name: np.zeros(shape + extra, np.float32) for name, extra in (
            ("observations", (meta.obs_dim,)), ("chains", (K + 1, args.chunk_len * meta.action_dim)),
            ("log_probs", ()), ("rewards", ()), ("terminals", ()), ("truncations", ()),
            ("next_observations", (meta.obs_dim,)))}  # fmt: skip
        t0 = time.time()
        for c in range(T):
            chains, log_probs, keys = explore_all(states.velocity, states.noise, obs.reshape(S, E, -1), keys,
                                                  sched.sigma_max, hp)  # fmt: skip
            chains = np.asarray(chains)
            chunk_actions = chains[:, :, -1].reshape(S * E, args.chunk_len, meta.action_dim)
            next_obs, reward, term, trunc, true_next = envs.step(chunk_actions)
            for name, value in (("observations", obs), ("chains", chains), ("log_probs", log_probs),
                                ("rewards", reward), ("terminals", term), ("truncations", trunc),
                                ("next_observations", true_next)):  # fmt: skip
                buf[name][c] = np.asarray(value).reshape(buf[name].shape[1:])
            obs = next_obs
        rollout = shard(Rollout(**{k: jnp.asarray(np.swapaxes(v, 0, 1)) for k, v in buf.items()}))  # (S, T, E, ...)
        states, keys, metrics = update_all(states, rollout, keys, Schedule(*map(jnp.asarray, sched)), hp)
        metrics = {k: np.asarray(v)[:, None] for k, v in jax.device_get(metrics).items()}
        since_eval, steps_since = since_eval + time.time() - t0, steps_since + per_iter
        it += 1
        t = it * per_iter
        logger.advance(per_iter)
        bad = first_nonfinite(metrics, t - 1, seeds)
        if bad:
            logger.stop_nonfinite(bad, " in online training")
        logger.metrics(args.total_steps + t, metrics)
        if t // args.eval_every > (t - per_iter) // args.eval_every or it == num_iters:
            evaluate_all(states, t, "online", {"train_env_steps_per_s": round(steps_since * S / since_eval, 1)})
            logger.save_checkpoint(states, t, keys, "online", host=envs.state())
            since_eval, steps_since = 0.0, 0
    envs.close()
    return states


# --- Training ---------------------------------------------------------------------------------
def describe_presets(given: Args, args: Args, meta: Meta) -> str:
    names = ("actor_lr", "actor_min_lr", "critic_lr", "critic_min_lr", "critic_weight_decay", "critic_warmup_iters",
             "sigma_min", "sigma_max", "eval_episodes")  # fmt: skip
    source = "run config" if args.resume else "flag"
    parts = [f"{n} {getattr(args, n):g} ({source if getattr(given, n) is not None else 'preset'})" for n in names]
    where = f"{meta.domain}, {meta.robot}/{meta.level}, {meta.size} transitions"
    return f"ReinFlow on {args.dataset} ({where}): K {args.denoising_steps}, Ta {args.chunk_len}, " + ", ".join(parts)


def train(args: Args) -> dict:
    data, meta = load_dataset(args.dataset)
    given, args = args, resolve(args, meta)
    observations = np.asarray(data.observations)
    normalize = obs_normalizer(observations)
    starts = chunk_starts(np.asarray(data.episode_starts), args.chunk_len)
    if len(starts) == 0:
        raise UserError(f"{args.dataset}: no episode has {args.chunk_len} steps, so there is no action chunk to learn")
    chunk_data = replicate(ChunkData(normalize(jnp.asarray(observations)), data.actions, jnp.asarray(starts)))
    agent = make_agent(args, meta.obs_dim, meta.action_dim, num_chunks=len(starts))
    init, pretrain_update, _, parts = agent
    # Members: every seed of every --sweep point (one point without --sweep), sharded over devices.
    points = sweep_points(args.sweep, args, SWEEPABLE)
    hp = shard(member_hyper(Hyper, args, points, args.num_seeds))
    seeds = list(range(args.seed, args.seed + args.num_seeds))
    members = member_labels(points, seeds)
    keys = jnp.stack([jax.random.key(s) for s in seeds])
    init_keys, keys = jax.vmap(lambda k: tuple(jax.random.split(k)))(keys)
    # One jitted init per seed, stacked: seed i starts exactly as a single-seed run would (and no
    # batched initializer reaches LAPACK, see iql.py).
    init_one = jax.jit(init)
    states = jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *[init_one(k) for k in init_keys])
    states, keys = shard(tile(states, len(points))), shard(tile(keys, len(points)))

    logger = RunLogger("reinflow", args, meta, seeds=seeds, paper_steps=PAPER_STEPS, points=points)
    print(describe_presets(given, args, meta)
          + (f"; sweep of {len(points)} points x {len(seeds)} seeds: {' '.join(args.sweep)}" if args.sweep else "")
          + (f"; members sharded over {jax.device_count()} devices" if jax.device_count() > 1 else ""),
          flush=True)  # fmt: skip
    step, phase, ck = 0, "offline", None
    if logger.resumed:
        ck = logger.load_checkpoint(states, keys)
        states, step, keys, phase = ck.state, ck.step, ck.rng, ck.phase
        print(f"resumed from {phase} step {step}", flush=True)

    K, Ta = args.denoising_steps, args.chunk_len

    @jax.jit
    def policy(velocity, carry, obs, prev_reward, rng):  # obs: (members, episodes, obs_dim)
        """The noise-free chain, a new chunk every Ta steps, executed open-loop; the carry holds the
        chunk and the step (every evaluation episode starts together). Member m draws seed m % num_seeds's
        noise, as a plain run does."""
        chunk, t = carry

        def new_chunk(_):
            keys = tile(jax.random.split(rng, args.num_seeds), obs.shape[0] // args.num_seeds)
            x = jax.vmap(lambda p, o, k: parts["denoise"](p, normalize(o), k, time_grid(K)))(velocity, obs, keys)
            return x.reshape(chunk.shape)

        chunk = jax.lax.cond(t % Ta == 0, new_chunk, lambda _: chunk, None)
        return chunk[:, :, t % Ta], (chunk, t + 1)

    carry = (jnp.zeros((len(members), args.eval_episodes, Ta, meta.action_dim)), jnp.int32(0))

    def evaluate_all(states, step, phase, extra=None):
        velocity = states.ema if phase == "offline" else states.velocity  # fine-tuning starts from the EMA
        result = evaluate(meta, policy, velocity, num_episodes=args.eval_episodes, seed=args.seed, carry=carry,
                          video=logger.video(step, phase))  # fmt: skip
        logger.evaluation(step, result, phase=phase, extra=extra)

    if args.eval_only:
        return logger.loaded(policy, states.ema if phase == "offline" else states.velocity, carry)

    t0 = time.time()
    if phase == "offline" and step < args.total_steps:
        logger.progress(args.total_steps, initial=step, desc="offline")
        chunks: dict[int, object] = {}
        while step < args.total_steps:
            n = min(args.eval_every, args.total_steps - step)
            if n not in chunks:
                chunks[n] = make_pretrain_chunk(pretrain_update, args.batch_size, Ta, n)
            states, keys, metrics = chunks[n](states, keys, chunk_data, hp)
            metrics = jax.device_get(metrics)
            bad = first_nonfinite(metrics, step, members)
            if bad:
                logger.stop_nonfinite(bad)
            step += n
            logger.advance(n)
            logger.metrics(step, metrics)
            evaluate_all(states, step, "offline")
            logger.save_checkpoint(states, step, keys, "offline")
        print(f"pre-training: {args.total_steps} updates in {time.time() - t0:.0f} s, "
              f"normalized {logger.record['final']['normalized_mean']:.1f}", flush=True)  # fmt: skip
    if args.online_steps > 0 and not (phase == "online" and step >= args.online_steps):
        if phase == "offline":  # fine-tuning starts from the EMA weights (own buffers: the state is donated)
            states = states._replace(velocity=jax.tree_util.tree_map(jnp.copy, states.ema))
        states = online_phase(args, meta, states, keys, agent, hp, normalize, logger, evaluate_all, members,
                              ck if phase == "online" else None)  # fmt: skip
    record = logger.close()
    final = record["final"]
    print(f"final normalized score {final['normalized_mean']:.1f} ± {final['normalized_std']:.1f} "
          f"(seeds {seeds}); record: {logger.run_dir / 'record.json'}", flush=True)  # fmt: skip
    return record


if __name__ == "__main__":
    cli(Args, train, validate=validate)
