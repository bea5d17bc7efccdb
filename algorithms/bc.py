"""Behaviour cloning (BC) and filtered BC (%BC): the baseline every offline table carries.

BC regresses the dataset's actions on its states with a deterministic MLP and a mean squared
error; it learns what the data does on average, never what would be better. Filtered BC ("10% BC"
in CORL's tables, after Chen et al., "Decision Transformer", NeurIPS 2021,
https://arxiv.org/abs/2106.01345) clones only the best episodes: an offline RL algorithm that does
not beat both on a dataset has not shown that it learns from rewards.

Follows CORL's any_percent_bc.py and its configs (configs/offline/bc*/): a 256-256 ReLU MLP with a
tanh output, PyTorch's default weight init (zero biases), Adam at 3e-4, batch 256, 1M updates, no dropout,
states standardized with the mean and std (+1e-3) of the data it trains on (the statistics are
part of the saved state and the evaluation policy applies them), deterministic evaluation.
`--top-fraction F` keeps whole episodes ranked by undiscounted return (CORL's bc_10 configs set
discount 1.0) until int(F * episodes) are kept, at least one; episodes are the dataset's own
(CORL cuts D4RL's flat arrays at terminals and every 1000 steps). One config for every dataset in
CORL, so no per-dataset presets here; only the evaluation episodes follow the domain.

Both write `runs/bc/<dataset>__<time>-<pid>/` with record["algorithm"] == "bc"; the fraction is
record["config"]["top_fraction"], from which results/tables.py names the row "BC" or "10% BC" and
files the record as `results/records/bc/<dataset>__<tier>[__top10].json`.

    python algorithms/bc.py                                    # local/hopper/medium-v0, 1M updates
    python algorithms/bc.py --dataset local/hopper/medium-v0 --num-seeds 3 --total-steps 100000
    python algorithms/bc.py --top-fraction 0.1                 # 10% BC
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

from common.data import UserError, load_dataset
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
    """a run directory to continue from its own config and checkpoint"""
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
    """gradient updates (CORL's 1M)"""
    eval_every: int = 5_000
    """updates between evaluations"""
    eval_episodes: int | None = None
    """evaluation episodes per seed (None: 10 on locomotion, 100 on mazes)"""
    batch_size: int = 256
    """transitions per update per seed"""
    hidden_dims: tuple[int, ...] = (256, 256)
    """hidden sizes of the policy MLP"""
    # --- BC ---
    top_fraction: float = 1.0
    """clone only the best fraction of episodes by return, in (0, 1] (1: plain BC; 0.1: CORL's 10% BC)"""
    lr: float = 3e-4
    """Adam learning rate (constant)"""
    normalize_states: bool = True
    """standardize observations with the mean and std of the cloned data"""
    sweep: tuple[str, ...] = ()
    """hyperparameter grid trained with the seeds as one program, e.g. --sweep lr=1e-4,3e-4,1e-3"""


PAPER_STEPS = (1_000_000, 0)  # CORL: 1M updates, offline only
STD_EPS = 1e-3  # CORL's compute_mean_std(states, eps=1e-3)
SWEEPABLE = ("lr",)  # the traced hyperparameters (Hyper)


def validate(args: Args) -> None:
    if not 0.0 < args.top_fraction <= 1.0:
        raise UserError(f"--top-fraction must be in (0, 1] (1: plain BC, 0.1: 10% BC), got {args.top_fraction}")
    sweep_points(args.sweep, args, SWEEPABLE)


def resolve(args: Args, meta) -> Args:
    """Fill the None fields from the domain (BC has no other presets)."""
    episodes = default_eval_episodes(meta.domain) if args.eval_episodes is None else args.eval_episodes
    return dataclasses.replace(args, eval_episodes=episodes)


def variant(top_fraction: float) -> str:
    """The name tables show: "BC", or "10% BC" for --top-fraction 0.1."""
    return "BC" if top_fraction >= 1.0 else f"{100 * top_fraction:g}% BC"


# --- Data -------------------------------------------------------------------------------------
def top_episodes(episode_returns: np.ndarray, fraction: float) -> np.ndarray:
    """Indices of the best int(fraction * episodes) episodes (at least one), best first; ties keep
    dataset order. The 1e-9 keeps 0.29 * 100 at 29 episodes despite float rounding."""
    n = len(episode_returns)
    keep = max(1, int(fraction * n + 1e-9))
    return np.argsort(-np.asarray(episode_returns, np.float64), kind="stable")[:keep]


def episode_rows(episode_lengths: np.ndarray, episodes: np.ndarray) -> np.ndarray:
    """Transition indices of the given episodes, in dataset order."""
    ends = np.cumsum(episode_lengths)
    starts = ends - episode_lengths
    return np.concatenate([np.arange(starts[e], ends[e]) for e in np.sort(episodes)])


def state_stats(observations, normalize: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """(mean, std + 1e-3) over the rows, as CORL; (0, 1) without normalization."""
    obs = np.asarray(observations, np.float64)
    if not normalize:
        return np.zeros(obs.shape[1], np.float32), np.ones(obs.shape[1], np.float32)
    return obs.mean(0).astype(np.float32), (obs.std(0) + STD_EPS).astype(np.float32)


# --- Network, state and loss ------------------------------------------------------------------
class Actor(nn.Module):
    """Deterministic MLP with a tanh output in [-1, 1]."""

    hidden_dims: tuple[int, ...]
    action_dim: int

    @nn.compact
    def __call__(self, obs):
        init = nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform")  # PyTorch's nn.Linear default
        x = obs
        for d in self.hidden_dims:
            x = nn.relu(nn.Dense(d, kernel_init=init)(x))
        return jnp.tanh(nn.Dense(self.action_dim, kernel_init=init)(x))


class TrainState(NamedTuple):
    """Everything one seed trains, and the state statistics its policy applies."""

    actor: dict
    actor_opt: optax.OptState
    obs_mean: jax.Array  # (obs_dim,)
    obs_std: jax.Array  # (obs_dim,)


class Hyper(NamedTuple):
    """Numeric hyperparameters as float32 arrays (vmappable)."""

    lr: jax.Array


class Batch(NamedTuple):
    observations: jax.Array
    actions: jax.Array


def bc_loss(actor_params, actor: nn.Module, observations: jax.Array, actions: jax.Array):
    """Mean squared error between the policy's and the dataset's actions, over batch and action
    dimensions (torch's F.mse_loss, as CORL)."""
    pred = actor.apply(actor_params, observations)
    loss = jnp.mean((pred - actions) ** 2)
    return loss, {"bc_loss": loss, "action_abs": jnp.abs(pred).mean()}


def make_agent(args: Args, obs_dim: int, action_dim: int):
    """init, update and act for one seed, closed over the (static) architecture."""
    actor = Actor(args.hidden_dims, action_dim)
    adam = optax.scale_by_adam()  # optax.adam without its learning rate, which comes from Hyper

    def init(key, obs_mean, obs_std) -> TrainState:
        params = actor.init(key, jnp.zeros((1, obs_dim)))
        return TrainState(params, adam.init(params), jnp.asarray(obs_mean), jnp.asarray(obs_std))

    def update(s: TrainState, batch: Batch, hp: Hyper):
        obs = (batch.observations - s.obs_mean) / s.obs_std
        grads, metrics = jax.grad(bc_loss, has_aux=True)(s.actor, actor, obs, batch.actions)
        updates, opt = adam.update(grads, s.actor_opt)
        params = optax.apply_updates(s.actor, jax.tree_util.tree_map(lambda u: -hp.lr * u, updates))
        return TrainState(params, opt, s.obs_mean, s.obs_std), metrics

    def act(s: TrainState, obs):
        return actor.apply(s.actor, (obs - s.obs_mean) / s.obs_std)

    return init, update, act


def make_train_chunk(update, batch_size: int, num_updates: int):
    """A jitted scan of `num_updates` updates, vmapped over members; batches drawn inside the scan."""

    def one_seed(state, key, data, hp):
        def body(carry, _):
            state, key = carry
            key, k_batch = jax.random.split(key)
            idx = jax.random.randint(k_batch, (batch_size,), 0, data.actions.shape[0])
            state, metrics = update(state, jax.tree_util.tree_map(lambda x: x[idx], data), hp)
            return (state, key), metrics

        (state, key), metrics = jax.lax.scan(body, (state, key), None, length=num_updates)
        return state, key, metrics  # metrics: (num_updates,) each

    vmapped = vmap_members(one_seed, in_axes=(0, 0, None, 0))  # hp per member: the sweep's values are traced
    return jax.jit(vmapped, donate_argnums=(0,))


# --- Training ---------------------------------------------------------------------------------
def train(args: Args) -> dict:
    validate(args)
    data, meta = load_dataset(args.dataset)
    args = resolve(args, meta)
    kept = top_episodes(meta.episode_returns, args.top_fraction)
    rows = episode_rows(meta.episode_lengths, kept)
    cloned = Batch(data.observations, data.actions)  # device-resident
    if len(rows) < meta.size:
        cloned = Batch(data.observations[rows], data.actions[rows])
    obs_mean, obs_std = state_stats(cloned.observations, args.normalize_states)
    cloned = replicate(cloned)

    init, update, act = make_agent(args, meta.obs_dim, meta.action_dim)
    # Members: every seed of every --sweep point (one point without --sweep), sharded over devices.
    points = sweep_points(args.sweep, args, SWEEPABLE)
    hp = shard(member_hyper(Hyper, args, points, args.num_seeds))
    seeds = list(range(args.seed, args.seed + args.num_seeds))
    members = member_labels(points, seeds)
    keys = jnp.stack([jax.random.key(s) for s in seeds])
    init_keys, keys = jax.vmap(lambda k: tuple(jax.random.split(k)))(keys)
    init_one = jax.jit(init)  # per seed, stacked: seed i starts as a single-seed run would
    states = jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *[init_one(k, obs_mean, obs_std) for k in init_keys])
    states, keys = shard(tile(states, len(points))), shard(tile(keys, len(points)))

    logger = RunLogger("bc", args, meta, seeds=seeds, paper_steps=PAPER_STEPS, points=points)
    print(f"{variant(args.top_fraction)} on {args.dataset} ({meta.domain}): {len(kept)} of "
          f"{len(meta.episode_returns)} episodes, {len(rows)} of {meta.size} transitions, returns "
          f">= {meta.episode_returns[kept].min():.1f}; normalize_states {args.normalize_states}, "
          f"lr {args.lr}, eval_episodes {args.eval_episodes}"
          + (f"; sweep of {len(points)} points x {len(seeds)} seeds: {' '.join(args.sweep)}" if args.sweep else "")
          + (f"; members sharded over {jax.device_count()} devices" if jax.device_count() > 1 else ""),
          flush=True)  # fmt: skip
    step = 0
    if logger.resumed:
        ck = logger.load_checkpoint(states, keys)
        states, step, keys = ck.state, ck.step, ck.rng
        print(f"resumed from step {step}", flush=True)

    @jax.jit
    def policy(states, carry, obs, prev_reward, rng):  # obs: (members, episodes, obs_dim)
        return jax.vmap(act)(states, obs), carry

    if args.eval_only:
        return logger.loaded(policy, states)
    t0, start = time.time(), step
    logger.progress(args.total_steps, initial=step)
    chunks: dict[int, object] = {}
    while step < args.total_steps:
        n = min(args.eval_every, args.total_steps - step)
        if n not in chunks:
            chunks[n] = make_train_chunk(update, args.batch_size, n)
        states, keys, metrics = chunks[n](states, keys, cloned, hp)
        metrics = jax.device_get(metrics)
        bad = first_nonfinite(metrics, step, members)
        if bad:
            logger.stop_nonfinite(bad)
        step += n
        logger.advance(n, bc_loss=float(np.mean(metrics["bc_loss"])))
        logger.metrics(step, metrics)
        result = evaluate(meta, policy, states, num_episodes=args.eval_episodes, seed=args.seed,
                          video=logger.video(step))  # fmt: skip
        logger.evaluation(step, result, "offline")
        logger.save_checkpoint(states, step, keys, "offline")
    record = logger.close()
    final = record["final"]
    print(f"{step - start} updates in {time.time() - t0:.0f} s; final normalized score "
          f"{final['normalized_mean']:.1f} ± {final['normalized_std']:.1f} (seeds {seeds}); "
          f"record: {logger.run_dir / 'record.json'}", flush=True)  # fmt: skip
    return record


if __name__ == "__main__":
    cli(Args, train, validate=validate)
