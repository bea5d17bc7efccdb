"""Decision Transformer (DT): Chen, Lu, Rajeswaran, Lee, Grover, Laskin, Abbeel, Srinivas and
Mordatch, "Decision Transformer: Reinforcement Learning via Sequence Modeling", NeurIPS 2021.
https://arxiv.org/abs/2106.01345

DT treats offline RL as sequence modelling: a causal (GPT-style) transformer reads the last K steps
as tokens (return-to-go, state, action) and regresses each action from the hidden state of its
state token. There is no critic and no bootstrapping; at test time the model is conditioned on a
target return, which is decreased by every reward received, and asked for the action that the
data's behaviour would take to collect that much return.

Follows the official code (kzl/decision-transformer, gym/: models/decision_transformer.py,
training/seq_trainer.py, experiment.py): a learned absolute-timestep embedding shared by the three
tokens of a step, LayerNorm on the embeddings, GPT-2 blocks (pre-LayerNorm, ReLU MLP of 4x width,
dropout on embeddings, attention and residuals; torch's LayerNorm eps 1e-5 throughout) without
positional embeddings, a tanh action head, MSE on non-padded steps, grad-norm clipping 0.25 then
AdamW (weight decay on every parameter, as torch's AdamW there) with a linear warmup, segments whose
start is drawn uniformly over all transitions (= episodes in proportion to their length, start
uniform within), left padding, states normalized by the dataset's mean and std, returns-to-go
(undiscounted) divided by 1000 on locomotion, and the paper's evaluation target per robot (hopper
3600, halfcheetah 6000, walker2d 5000). Evaluation runs every episode of every seed at once; each
environment keeps a fixed-size window of its last K steps in the policy's carry, so nothing
recompiles during an episode.

Mazes (antmaze, pointmaze; not in the paper) follow this repo's rule: their returns are on no
fixed scale (1 per goal-reaching episode of a local sparse PointMaze set, tens on a dense one,
up to hundreds of steps at the goal where episodes run on), so the return-to-go scale is the
dataset's best episode return (the data's returns-to-go lie in [0, 1]) and, as the paper gives no
target there, the evaluation is conditioned on that best return (R_0 = 1). 100 evaluation
episodes per seed on mazes, 10 on locomotion.

Written for speed where that changes nothing computed: the dense layers see (N, C) token matrices,
attention is GPT-2's fused query-key-value projection written out, LayerNorm is written out so that
XLA fuses it, and dropout masks come from a hash of each element's index (the same drop rate, a
cheaper random stream than threefry per element). results/throughput has each step's before and
after on this repo's 2-core CPUs.

    python algorithms/dt.py                                    # local/hopper/medium-v0, paper budget
    python algorithms/dt.py --dataset local/walker2d/medium-v0 --num-seeds 2 --total-steps 10000
    python algorithms/dt.py --dataset local/hopper/medium-v0 --target-return 1800
    python algorithms/dt.py --dataset local/pointmaze/umaze-sparse-v0 --total-steps 20000
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
    total_steps: int = 100_000
    """gradient updates (the official 10 iterations x 10k)"""
    eval_every: int = 10_000
    """updates between evaluations"""
    eval_episodes: int | None = None
    """evaluation episodes per seed (None: 10 on locomotion, 100 on mazes)"""
    batch_size: int = 64
    """trajectory segments per update per seed"""
    learning_rate: float = 1e-4
    """AdamW learning rate after warmup"""
    weight_decay: float = 1e-4
    """AdamW decoupled weight decay (on every parameter, as torch's AdamW in the official code)"""
    warmup_steps: int = 10_000
    """linear learning-rate warmup: lr * min((step + 1) / warmup_steps, 1)"""
    grad_clip: float = 0.25
    """global gradient-norm clip, before AdamW"""
    # --- Decision Transformer ---
    context_len: int = 20
    """K: steps in the context window (3K tokens)"""
    embed_dim: int = 128
    """transformer width"""
    num_layers: int = 3
    """transformer blocks"""
    num_heads: int = 1
    """attention heads"""
    dropout: float = 0.1
    """dropout on embeddings, attention weights and residual branches"""
    rtg_scale: float | None = None
    """returns-to-go are divided by this at train and test time (None: the preset, 1000 on
    locomotion and adroit, the dataset's best episode return on mazes, 1 on kitchen)"""
    target_return: float | None = None
    """return the evaluation is conditioned on (None: the preset, the paper's per robot, hopper
    3600, halfcheetah 6000, walker2d 5000; otherwise the dataset's best episode return)"""
    max_ep_len: int | None = None
    """rows of the timestep embedding; later steps are clipped to the last row (None: the
    evaluation env's time limit, or 1000)"""
    sweep: tuple[str, ...] = ()
    """hyperparameter grid trained with the seeds as one program, e.g. --sweep learning-rate=1e-4,3e-4"""


# Presets per domain. DATA_MAX stands for the dataset's best episode return.
DATA_MAX = "dataset max return"
PRESETS = {
    # The paper's scale 1000 for MuJoCo (and the official code's for every gym env).
    "locomotion": dict(rtg_scale=1000.0, target_return=DATA_MAX),
    "adroit": dict(rtg_scale=1000.0, target_return=DATA_MAX),
    # Goal-reaching (this repo's rule, the paper has none): returns on no fixed scale, so divide
    # by the data's best (rtg in [0, 1]) and condition on it.
    "antmaze": dict(rtg_scale=DATA_MAX, target_return=DATA_MAX),
    "pointmaze": dict(rtg_scale=DATA_MAX, target_return=DATA_MAX),
    "kitchen": dict(rtg_scale=1.0, target_return=DATA_MAX),  # <= 4 subtasks: already O(1)
}
# Refinements by robot (every level) or (robot, level): the paper's evaluation targets (its
# appendix; the official code's first target per env), one per robot: this repo's choice.
DATASET_PRESETS: dict[str | tuple[str, str], dict] = {
    "hopper": dict(target_return=3600.0),
    "halfcheetah": dict(target_return=6000.0),
    "walker2d": dict(target_return=5000.0),
}
PAD_ACTION = -10.0  # the official training padding; the mask hides it
PAPER_STEPS = (100_000, 0)
# The traced hyperparameters (Hyper), all of them: warmup_steps too, as it only enters the schedule
# as the float divisor of lr * min((count + 1) / warmup_steps, 1), never a shape or a loop bound.
SWEEPABLE = ("learning_rate", "weight_decay", "warmup_steps", "grad_clip")


def preset_for(meta: Meta) -> dict[str, float]:
    """The table's rtg_scale and target_return for this dataset, DATA_MAX filled in (a scale of 1
    where no episode has a positive return)."""
    best = float(np.max(meta.episode_returns))
    table = {
        **PRESETS[meta.domain],
        **DATASET_PRESETS.get(meta.robot, {}),
        **DATASET_PRESETS.get((meta.robot, meta.level), {}),
    }
    return {
        "rtg_scale": (best if best > 0 else 1.0) if table["rtg_scale"] == DATA_MAX else table["rtg_scale"],
        "target_return": best if table["target_return"] == DATA_MAX else table["target_return"],
    }


def resolve(args: Args, meta: Meta) -> Args:
    """Fill the None fields from the dataset's preset (domain, then robot and level); an explicit
    flag always wins."""
    preset = {
        **preset_for(meta),
        "eval_episodes": default_eval_episodes(meta.domain),
        "max_ep_len": meta.env_spec.max_episode_steps or 1000,
    }
    return dataclasses.replace(args, **{k: v for k, v in preset.items() if getattr(args, k) is None})


def validate(args: Args) -> None:
    """DT's own flags, checked before anything loads (common's cli checks the shared ones); every
    --sweep point's values pass the same checks as the flags."""
    points = sweep_points(args.sweep, args, SWEEPABLE)
    for point in points:
        check_flags(dataclasses.replace(args, **point))


def check_flags(args: Args) -> None:
    checks = [
        (args.context_len >= 1, f"--context-len must be at least 1, got {args.context_len}"),
        (args.embed_dim >= 1, f"--embed-dim must be at least 1, got {args.embed_dim}"),
        (args.num_heads >= 1, f"--num-heads must be at least 1, got {args.num_heads}"),
        (
            args.embed_dim % max(args.num_heads, 1) == 0,
            f"--embed-dim {args.embed_dim} must be divisible by --num-heads {args.num_heads}",
        ),
        (args.num_layers >= 1, f"--num-layers must be at least 1, got {args.num_layers}"),
        (0.0 <= args.dropout < 1.0, f"--dropout must be in [0, 1), got {args.dropout}"),
        (args.learning_rate > 0, f"--learning-rate must be positive, got {args.learning_rate}"),
        (args.weight_decay >= 0, f"--weight-decay must be 0 or more, got {args.weight_decay}"),
        (args.warmup_steps >= 1, f"--warmup-steps must be at least 1, got {args.warmup_steps}"),
        (args.grad_clip > 0, f"--grad-clip must be positive, got {args.grad_clip}"),
        (
            args.rtg_scale is None or (np.isfinite(args.rtg_scale) and args.rtg_scale > 0),
            f"--rtg-scale must be a positive number, got {args.rtg_scale}",
        ),
        (
            args.target_return is None or np.isfinite(args.target_return),
            f"--target-return must be a finite number, got {args.target_return}",
        ),
        (args.max_ep_len is None or args.max_ep_len >= 1, f"--max-ep-len must be at least 1, got {args.max_ep_len}"),
    ]
    for ok, message in checks:
        if not ok:
            raise UserError(message)


# --- Networks ---------------------------------------------------------------------------------
def gpt_init():
    return nn.initializers.normal(0.02)  # GPT-2's initializer_range


def mix32(x: jax.Array) -> jax.Array:
    """A 32-bit integer hash (xorshift-multiply, Wellons' "lowbias32" constants): a bijection of
    uint32 whose every output bit depends on every input bit."""
    x = x ^ (x >> 16)
    x = x * jnp.uint32(0x7FEB352D)
    x = x ^ (x >> 15)
    x = x * jnp.uint32(0x846CA68B)
    return x ^ (x >> 16)


class Dropout(nn.Module):
    """Inverted dropout (torch's nn.Dropout): each element is zeroed with probability `rate`, the rest
    scaled by 1 / (1 - rate). The mask comes from a counter hash, mix32(mix32(i ^ s0) ^ s1) of each
    element's index i under a 64-bit seed (s0, s1) drawn from the module's threefry key: one fused
    elementwise pass, where threefry bits for every element made dropout 15% of the update on 2 CPU
    cores (8.7 updates/s, 10.2 without dropout; results/throughput, 3 December 2026). Members still
    get their own masks (the seed comes from their key)."""

    rate: float

    @nn.compact
    def __call__(self, x: jax.Array, deterministic: bool) -> jax.Array:
        if deterministic or self.rate == 0.0:
            return x
        seed = jax.random.bits(self.make_rng("dropout"), (2,), jnp.uint32)
        index = jnp.arange(x.size, dtype=jnp.uint32).reshape(x.shape)
        keep = mix32(mix32(index ^ seed[0]) ^ seed[1]) >= jnp.uint32(round(self.rate * 2**32))
        return jnp.where(keep, x / (1.0 - self.rate), 0.0).astype(x.dtype)


class LayerNorm(nn.Module):
    """torch's nn.LayerNorm as GPT-2 and the official embedding LayerNorm use it (eps 1e-5, variance
    of the centred tokens), with flax's parameter names. Written out because flax's LayerNorm
    multiplies 1/std by the scale first, a (tokens x features) product that XLA's CPU backend
    materializes, where here the scale multiplies inside one fused pass."""

    epsilon: float = 1e-5

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        scale = self.param("scale", nn.initializers.ones, (x.shape[-1],))
        bias = self.param("bias", nn.initializers.zeros, (x.shape[-1],))
        centred = x - x.mean(-1, keepdims=True)
        return centred * jax.lax.rsqrt((centred**2).mean(-1, keepdims=True) + self.epsilon) * scale + bias


def on_tokens(layer: nn.Module, x: jax.Array) -> jax.Array:
    """A dense layer applied to (..., C) tokens as one (N, C) matrix. Same result as layer(x); on XLA's
    CPU backend the weight gradient of a 3-D dot (contracting batch and time) ran up to 3.5x slower than
    the same 2-D matmul (results/throughput: DT's matmuls at their own shapes)."""
    return layer(x.reshape(-1, x.shape[-1])).reshape(*x.shape[:-1], -1)


class Block(nn.Module):
    """GPT-2 block: x + attn(LN(x)), then x + MLP(LN(x)); MLP width 4H with ReLU as in the DT config.
    Attention as GPT-2's: one fused query-key-value projection (c_attn), causal softmax with the padded
    keys masked, dropout on the attention weights, output projection (c_proj), residual dropout."""

    embed_dim: int
    num_heads: int
    dropout: float

    @nn.compact
    def __call__(self, x, mask, training: bool):
        B, T, C = x.shape
        H, D = self.num_heads, C // self.num_heads
        dense = lambda n, name: nn.Dense(n, kernel_init=gpt_init(), name=name)  # noqa: E731
        drop = lambda h: Dropout(self.dropout)(h, deterministic=not training)  # noqa: E731
        qkv = on_tokens(dense(3 * C, "qkv"), LayerNorm()(x)).reshape(B, T, 3, H, D)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]  # (B, T, H, D)
        logits = jnp.einsum("bqhd,bkhd->bhqk", q / jnp.sqrt(D).astype(q.dtype), k)
        weights = jax.nn.softmax(jnp.where(mask, logits, jnp.finfo(logits.dtype).min), axis=-1)
        h = jnp.einsum("bhqk,bkhd->bqhd", drop(weights), v).reshape(B, T, C)
        x = x + drop(on_tokens(dense(C, "proj"), h))
        h = nn.relu(on_tokens(dense(4 * C, "fc"), LayerNorm()(x)))
        return x + drop(on_tokens(dense(C, "fc_out"), h))


class DecisionTransformer(nn.Module):
    action_dim: int
    embed_dim: int
    num_layers: int
    num_heads: int
    max_ep_len: int
    dropout: float

    @nn.compact
    def __call__(self, states, actions, rtg, timesteps, mask, training: bool = False):
        """states (B, K, obs_dim), actions (B, K, act_dim), rtg (B, K), timesteps (B, K) int,
        mask (B, K) bool (False = padding) -> predicted actions (B, K, act_dim) in [-1, 1]."""
        B, K = mask.shape
        dense = lambda name: nn.Dense(self.embed_dim, kernel_init=gpt_init(), name=name)  # noqa: E731
        t_emb = nn.Embed(self.max_ep_len, self.embed_dim, embedding_init=gpt_init(), name="embed_timestep")
        t_emb = t_emb(timesteps)
        r_tok = on_tokens(dense("embed_return"), rtg[..., None]) + t_emb
        s_tok = on_tokens(dense("embed_state"), states) + t_emb
        a_tok = on_tokens(dense("embed_action"), actions) + t_emb
        x = jnp.stack([r_tok, s_tok, a_tok], axis=2).reshape(B, 3 * K, self.embed_dim)  # R_1 s_1 a_1 R_2 ...
        x = Dropout(self.dropout)(LayerNorm()(x), deterministic=not training)
        keys_valid = jnp.repeat(mask, 3, axis=1)  # (B, 3K)
        attn_mask = nn.combine_masks(nn.make_causal_mask(keys_valid), keys_valid[:, None, None, :])
        for _ in range(self.num_layers):
            x = Block(self.embed_dim, self.num_heads, self.dropout)(x, attn_mask, training)
        x = LayerNorm()(x).reshape(B, K, 3, self.embed_dim)
        # a_t is read from the state token s_t: it sees R_<=t, s_<=t and a_<t only.
        head = nn.Dense(self.action_dim, kernel_init=gpt_init(), name="action_head")
        return jnp.tanh(on_tokens(head, x[:, :, 1]))


class TrainState(NamedTuple):
    """Everything one seed trains."""

    params: dict
    opt_state: optax.OptState  # clip + AdamW; its schedule counts the updates for the warmup
    step: jax.Array  # int32, updates done (for the logged learning rate)


class Hyper(NamedTuple):
    """Numeric hyperparameters that do not change shapes, as float32 arrays (vmappable)."""

    learning_rate: jax.Array
    weight_decay: jax.Array
    warmup_steps: jax.Array
    grad_clip: jax.Array


class Segments(NamedTuple):
    """The dataset as DT samples it, on device, one row per transition."""

    states: jax.Array  # (N, obs_dim) normalized
    actions: jax.Array  # (N, act_dim)
    rtg: jax.Array  # (N,) scaled undiscounted return-to-go to the episode's end
    timesteps: jax.Array  # (N,) int32, clipped to max_ep_len - 1
    episode_end: jax.Array  # (N,) int32, index one past the last transition of its episode
    pad_state: jax.Array  # (obs_dim,) a raw zero state after normalization (official padding)


class Batch(NamedTuple):
    states: jax.Array  # (B, K, obs_dim)
    actions: jax.Array  # (B, K, act_dim)
    rtg: jax.Array  # (B, K)
    timesteps: jax.Array  # (B, K)
    mask: jax.Array  # (B, K) bool, False on left padding


# --- Data -------------------------------------------------------------------------------------
def returns_to_go(rewards: np.ndarray, episode_starts: np.ndarray) -> np.ndarray:
    """Undiscounted sum of rewards from each step to the end of its episode (gamma = 1)."""
    ep = np.cumsum(episode_starts) - 1
    total = np.bincount(ep, weights=rewards.astype(np.float64))
    before = np.cumsum(rewards, dtype=np.float64) - rewards  # reward sum over earlier transitions
    ep_first = np.flatnonzero(episode_starts)
    return total[ep] - (before - before[ep_first][ep])


def make_segments(data, rtg_scale: float, max_ep_len: int) -> tuple[Segments, np.ndarray, np.ndarray]:
    """(Segments, state mean, state std); the statistics are the official ones (std + 1e-6)."""
    obs = np.asarray(data.observations, np.float64)
    mean, std = obs.mean(0), obs.std(0) + 1e-6
    starts = np.asarray(data.episode_starts)
    rtg = returns_to_go(np.asarray(data.rewards), starts)
    ep = np.cumsum(starts) - 1
    bounds = np.append(np.flatnonzero(starts), len(starts))
    segments = Segments(
        jnp.asarray((obs - mean) / std, jnp.float32),
        jnp.asarray(data.actions, jnp.float32),
        jnp.asarray(rtg / rtg_scale, jnp.float32),
        jnp.asarray(np.minimum(np.asarray(data.timesteps), max_ep_len - 1), jnp.int32),
        jnp.asarray(bounds[ep + 1], jnp.int32),
        jnp.asarray(-mean / std, jnp.float32),
    )
    return segments, mean.astype(np.float32), std.astype(np.float32)


def sample_batch(data: Segments, key, batch_size: int, context_len: int) -> Batch:
    """Segments of up to K steps, left-padded to K. A start drawn uniformly over all transitions is
    the official scheme: an episode with probability proportional to its length, then a uniform
    start within it; the segment stops at the episode's end."""
    start = jax.random.randint(key, (batch_size, 1), 0, data.rtg.shape[0])
    length = jnp.minimum(data.episode_end[start] - start, context_len)  # (B, 1), >= 1
    j = jnp.arange(context_len)[None]
    mask = j >= context_len - length  # (B, K)
    idx = jnp.where(mask, start + j - (context_len - length), start)
    return Batch(
        jnp.where(mask[..., None], data.states[idx], data.pad_state),
        jnp.where(mask[..., None], data.actions[idx], PAD_ACTION),
        jnp.where(mask, data.rtg[idx], 0.0),
        jnp.where(mask, data.timesteps[idx], 0),
        mask,
    )


# --- Loss, optimizer and the update ------------------------------------------------------------
def masked_mse(pred: jax.Array, target: jax.Array, mask: jax.Array) -> jax.Array:
    """Mean of (pred - target)^2 over non-padded steps and action dimensions."""
    se = ((pred - target) ** 2).sum(-1)
    return (se * mask).sum() / (mask.sum() * pred.shape[-1])


def action_loss(params, model: DecisionTransformer, batch: Batch, key) -> tuple[jax.Array, dict]:
    """DT's only loss: the MSE of the actions predicted from each state token (dropout on)."""
    pred = model.apply(
        params, batch.states, batch.actions, batch.rtg, batch.timesteps, batch.mask,
        training=True, rngs={"dropout": key},
    )  # fmt: skip
    loss = masked_mse(pred, batch.actions, batch.mask)
    return loss, {"action_mse": loss}


def warmup_schedule(hp: Hyper) -> optax.Schedule:
    """The official LambdaLR as an optax schedule of the update count: lr * min((count + 1) / warmup, 1)."""
    return lambda count: hp.learning_rate * jnp.minimum((count + 1) / hp.warmup_steps, 1.0)


def make_optimizer(hp: Hyper) -> optax.GradientTransformation:
    """torch's clip_grad_norm_ then AdamW, as the official trainer: decay on every parameter (no
    mask: torch.optim.AdamW(model.parameters())), betas (0.9, 0.999), eps 1e-8. optax clips to
    g * c / |g| where torch uses c / (|g| + 1e-6): a 4e-6 relative difference on clipped updates.
    Built from `hp` inside the update, so the hyperparameters stay arrays; the state's structure
    does not depend on them."""
    return optax.chain(
        optax.clip_by_global_norm(hp.grad_clip),
        optax.adamw(warmup_schedule(hp), b1=0.9, b2=0.999, eps=1e-8, weight_decay=hp.weight_decay),
    )


def make_agent(args: Args, obs_dim: int, action_dim: int):
    """init, update and the model for one seed, closed over the (static) architecture."""
    model = DecisionTransformer(
        action_dim, args.embed_dim, args.num_layers, args.num_heads, args.max_ep_len, args.dropout
    )

    def init(key, hp: Hyper) -> TrainState:
        K = args.context_len
        params = model.init(
            key, jnp.zeros((1, K, obs_dim)), jnp.zeros((1, K, action_dim)), jnp.zeros((1, K)),
            jnp.zeros((1, K), jnp.int32), jnp.ones((1, K), bool),
        )  # fmt: skip
        return TrainState(params, make_optimizer(hp).init(params), jnp.int32(0))

    def update(s: TrainState, batch: Batch, key, hp: Hyper):
        (_, metrics), grads = jax.value_and_grad(action_loss, has_aux=True)(s.params, model, batch, key)
        updates, opt_state = make_optimizer(hp).update(grads, s.opt_state, s.params)
        params = optax.apply_updates(s.params, updates)
        metrics = {**metrics, "grad_norm": optax.global_norm(grads), "lr": warmup_schedule(hp)(s.step)}
        return TrainState(params, opt_state, s.step + 1), metrics

    return init, update, model


def make_train_chunk(update, batch_size: int, context_len: int, num_updates: int):
    """A jitted scan of `num_updates` updates, vmapped over members; segments drawn inside the scan."""

    def one_seed(state, key, data, hp):
        def body(carry, _):
            state, key = carry
            key, k_batch, k_update = jax.random.split(key, 3)
            state, metrics = update(state, sample_batch(data, k_batch, batch_size, context_len), k_update, hp)
            return (state, key), metrics

        (state, key), metrics = jax.lax.scan(body, (state, key), None, length=num_updates)
        return state, key, metrics  # metrics: (num_updates,) each

    vmapped = vmap_members(one_seed, in_axes=(0, 0, None, 0))  # hp per member: the sweep's values are traced
    return jax.jit(vmapped, donate_argnums=(0,))


# --- Evaluation -------------------------------------------------------------------------------
class Context(NamedTuple):
    """The last K steps of every evaluation environment, oldest first; leading axes (seeds, episodes).
    Shapes never change: each step shifts the window by one and writes the newest step last."""

    states: jax.Array  # (..., K, obs_dim) normalized
    actions: jax.Array  # (..., K, act_dim)
    rtg: jax.Array  # (..., K) scaled
    timesteps: jax.Array  # (..., K) int32
    mask: jax.Array  # (..., K) bool: True on the last min(t, K) slots
    t: jax.Array  # (...,) int32, steps taken in this episode
    rtg_now: jax.Array  # (...,) scaled return still to collect


def initial_context(num_seeds: int, num_episodes: int, context_len: int, obs_dim: int, action_dim: int,
                    target_return: float, rtg_scale: float) -> Context:  # fmt: skip
    lead = (num_seeds, num_episodes)
    return Context(
        jnp.zeros((*lead, context_len, obs_dim)),
        jnp.zeros((*lead, context_len, action_dim)),
        jnp.zeros((*lead, context_len)),
        jnp.zeros((*lead, context_len), jnp.int32),
        jnp.zeros((*lead, context_len), bool),
        jnp.zeros(lead, jnp.int32),
        jnp.full(lead, target_return / rtg_scale, jnp.float32),
    )


def push_step(ctx: Context, obs: jax.Array, prev_reward: jax.Array, rtg_scale, max_ep_len: int) -> Context:
    """Shift the window and append step t: its normalized state, R_t = R_{t-1} - r_{t-1} / scale
    (the official update), its timestep, and a zero action placeholder filled after the forward."""
    rtg_now = jnp.where(ctx.t > 0, ctx.rtg_now - prev_reward / rtg_scale, ctx.rtg_now)
    return Context(
        jnp.concatenate([ctx.states[..., 1:, :], obs[..., None, :]], axis=-2),
        jnp.concatenate([ctx.actions[..., 1:, :], jnp.zeros_like(ctx.actions[..., :1, :])], axis=-2),
        jnp.concatenate([ctx.rtg[..., 1:], rtg_now[..., None]], axis=-1),
        jnp.concatenate([ctx.timesteps[..., 1:], jnp.minimum(ctx.t, max_ep_len - 1)[..., None]], axis=-1),
        jnp.concatenate([ctx.mask[..., 1:], jnp.ones_like(ctx.mask[..., :1])], axis=-1),
        ctx.t + 1,
        rtg_now,
    )


def make_policy(model, obs_mean, obs_std, rtg_scale: float, max_ep_len: int):
    """The evaluation policy of common.evaluation: one jitted call per environment step for every
    environment of every seed; the context window travels in `carry`."""
    mean, std = jnp.asarray(obs_mean), jnp.asarray(obs_std)

    def dt_policy(params, ctx: Context, obs, prev_reward, rng):  # obs: (num_seeds, episodes, obs_dim)
        ctx = push_step(ctx, (obs - mean) / std, prev_reward, rtg_scale, max_ep_len)
        forward = jax.vmap(lambda p, c: model.apply(p, c.states, c.actions, c.rtg, c.timesteps, c.mask))
        actions = forward(params, ctx)[..., -1, :]  # (num_seeds, episodes, act_dim)
        return actions, ctx._replace(actions=ctx.actions.at[..., -1, :].set(actions))

    return jax.jit(dt_policy)


# --- Training ---------------------------------------------------------------------------------
def describe_presets(given: Args, args: Args, meta: Meta) -> str:
    """One line: every preset-resolved value and where it came from (a resumed run's config holds
    the values its first start resolved)."""
    names = ("rtg_scale", "target_return", "eval_episodes", "max_ep_len")
    source = "run config" if args.resume else "flag"
    parts = [f"{n} {getattr(args, n):g} ({source if getattr(given, n) is not None else 'preset'})" for n in names]
    where = f"{meta.domain}, {meta.robot}/{meta.level}, {meta.size} transitions"
    return f"DT on {args.dataset} ({where}): " + ", ".join(parts)


def train(args: Args) -> dict:
    data, meta = load_dataset(args.dataset)
    given, args = args, resolve(args, meta)
    segments, obs_mean, obs_std = make_segments(data, args.rtg_scale, args.max_ep_len)
    segments = replicate(segments)
    init, update, model = make_agent(args, meta.obs_dim, meta.action_dim)
    # Members: every seed of every --sweep point (one point without --sweep), sharded over devices.
    points = sweep_points(args.sweep, args, SWEEPABLE)
    hp = shard(member_hyper(Hyper, args, points, args.num_seeds))
    seeds = list(range(args.seed, args.seed + args.num_seeds))
    members = member_labels(points, seeds)
    keys = jnp.stack([jax.random.key(s) for s in seeds])
    init_keys, keys = jax.vmap(lambda k: tuple(jax.random.split(k)))(keys)
    # One jitted init per seed, stacked: seed i starts exactly as a single-seed run would. The
    # optimizer state's structure and initial values do not depend on the hyperparameters, so the
    # flags' scalar Hyper builds it for every grid point.
    hp_init = Hyper(*map(jnp.float32, (args.learning_rate, args.weight_decay, args.warmup_steps, args.grad_clip)))
    init_one = jax.jit(init)
    states = jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *[init_one(k, hp_init) for k in init_keys])
    states, keys = shard(tile(states, len(points))), shard(tile(keys, len(points)))

    logger = RunLogger("dt", args, meta, seeds=seeds, paper_steps=PAPER_STEPS, points=points)
    print(describe_presets(given, args, meta)
          + (f"; sweep of {len(points)} points x {len(seeds)} seeds: {' '.join(args.sweep)}" if args.sweep else "")
          + (f"; members sharded over {jax.device_count()} devices" if jax.device_count() > 1 else ""),
          flush=True)  # fmt: skip
    step = 0
    if logger.resumed:
        ck = logger.load_checkpoint(states, keys)
        states, step, keys = ck.state, ck.step, ck.rng
        print(f"resumed from step {step}", flush=True)

    policy = make_policy(model, obs_mean, obs_std, args.rtg_scale, args.max_ep_len)
    context = initial_context(  # one window per environment of every member
        len(members), args.eval_episodes, args.context_len, meta.obs_dim, meta.action_dim,
        args.target_return, args.rtg_scale,
    )  # fmt: skip
    if args.eval_only:
        return logger.loaded(policy, states.params, context)
    t0 = time.time()
    logger.progress(args.total_steps, initial=step, desc="offline")
    chunks: dict[int, object] = {}
    while step < args.total_steps:
        n = min(args.eval_every, args.total_steps - step)
        if n not in chunks:
            chunks[n] = make_train_chunk(update, args.batch_size, args.context_len, n)
        states, keys, metrics = chunks[n](states, keys, segments, hp)
        metrics = jax.device_get(metrics)
        bad = first_nonfinite(metrics, step, members)
        if bad:
            logger.stop_nonfinite(bad)
        step += n
        logger.advance(n)
        logger.metrics(step, metrics)
        result = evaluate(meta, policy, states.params, num_episodes=args.eval_episodes, seed=args.seed, carry=context,
                          video=logger.video(step))  # fmt: skip
        logger.evaluation(step, result, phase="offline")
        logger.save_checkpoint(states, step, keys, "offline")
    record = logger.close()
    final = record["final"]
    print(f"{step} updates in {time.time() - t0:.0f} s; final normalized score "
          f"{final['normalized_mean']:.1f} ± {final['normalized_std']:.1f} (seeds {seeds}); "
          f"record: {logger.run_dir / 'record.json'}", flush=True)  # fmt: skip
    return record


if __name__ == "__main__":
    cli(Args, train, validate=validate)
