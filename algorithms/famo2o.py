"""FamO2O on IQL: Wang, Wu, Fu, Pan, Chen, Xu and Huang, "Train Once, Get a Family: State-Adaptive
Balances for Offline-to-Online Reinforcement Learning", NeurIPS 2023. https://arxiv.org/abs/2310.17966

Offline-to-online methods fix one balance between improving on the data and staying close to it
(IQL's inverse temperature beta) for every state. FamO2O trains a whole family of policies at once,
a universal policy pi_u(a | s, beta) conditioned on beta through a sinusoidal code, and a balance
model pi_b(beta | s) that picks, per state, the member whose action the critic values most. Offline,
the universal policy learns every member (beta drawn uniformly per sample, the advantage weights
exp(beta * (Q - V)) using the same beta); online, beta comes from the balance model, so each state
fine-tunes with its own balance.

Follows the official code (LeapLabTHU/FamO2O, jax_iql/): IQL's value and critic updates unchanged
(see iql.py); per update V -> balance model -> its temperature -> universal policy -> Q -> Polyak.
The balance model is a tanh-squashed 1-D Gaussian with a state-independent log-std, its sample x in
(-1, 1) mapped to beta = (x + 1) / 2 * (beta_max - beta_min) + beta_min, trained SAC-style through
the frozen universal policy against the target critic, with its own entropy temperature (target
entropy -1/2). It is trained offline too; only the universal policy's beta switches from uniform to
balance samples online (drawn from the balance model as it was before this update, as the official
code passes it). Acting uses the balance model's deterministic beta (tanh of its mean). Differences,
on purpose: the advantage weights use each sample's own beta (the method as described: one beta per
sample for both); the official code's (B,) advantages times its (B, 1) betas broadcast to a B x B
matrix that the loss averages, so there a sample's weight is the mean of min(exp(beta_i * adv), 100)
over the batch's betas and does not depend on the beta the policy is given
(--official-weight-broadcast does that); the balance loss draws its beta and its action with two
keys (the official code reuses one); no dropout (the released configs use none); offline-only runs
(--online-steps 0) decay the universal policy's learning rate to 0 by cosine, as iql.py (the
official FamO2O never decays it; a resumed run whose larger budget changes it says so). The
official code released only an AntMaze config (beta in (8, 14), expectile 0.9); the locomotion
preset, beta in (1, 5) with expectile 0.7, is the learner's default range with IQL's locomotion
expectile. PointMaze uses the AntMaze preset, as iql.py does.

    python algorithms/famo2o.py --dataset local/walker2d/medium-replay-v0 --total-steps 100000 --online-steps 50000
    python algorithms/famo2o.py --dataset local/pointmaze/medium-sparse-v0 --num-seeds 3
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
from common.logging import RunLogger, UserError, cli, first_nonfinite
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
    online_steps: int = 1_000_000
    """online environment steps after the offline phase, one update each (the paper's 1M)"""
    eval_every: int = 5_000
    """updates (offline) or environment steps (online) between evaluations"""
    eval_episodes: int | None = None
    """evaluation episodes per seed (None: 10 on locomotion, 100 on mazes)"""
    batch_size: int = 256
    """transitions per update per seed"""
    hidden_dims: tuple[int, ...] = (256, 256)
    """hidden sizes of the universal policy, balance model, critic and value MLPs"""
    # --- IQL ---
    expectile: float | None = None
    """expectile tau of the value loss (None: the dataset's preset: 0.7 locomotion, 0.9 mazes)"""
    discount: float = 0.99
    """discount gamma"""
    tau: float = 0.005
    """Polyak rate of the target critic"""
    actor_lr: float = 3e-4
    """universal policy and balance model learning rate (the policy's decays to 0 by cosine when offline only)"""
    critic_lr: float = 3e-4
    """critic learning rate"""
    value_lr: float = 3e-4
    """value learning rate"""
    exploration_temperature: float = 1.0
    """scale of the universal policy's std when acting online"""
    # --- FamO2O ---
    beta_min: float | None = None
    """lower end of the balance coefficient range (None: preset, 1 locomotion, 8 mazes)"""
    beta_max: float | None = None
    """upper end of the balance coefficient range (None: preset, 5 locomotion, 14 mazes)"""
    temp_lr: float = 3e-4
    """learning rate of the balance model's entropy temperature"""
    init_temperature: float = 1.0
    """initial entropy temperature of the balance model"""
    target_entropy: float = -0.5
    """target entropy of the balance model (the official -1/2 for its one dimension)"""
    official_weight_broadcast: bool = False
    """the official code's advantage weights: its (B,) advantages times a (B, 1) beta broadcast to B x B,
    so sample j is weighted by mean_i min(exp(beta_i adv_j), 100), whatever its own beta"""
    sweep: tuple[str, ...] = ()
    """hyperparameter grid trained with the seeds as one program, e.g. --sweep expectile=0.7,0.9 beta-max=5,10"""


# Presets per domain: the official AntMaze config (jax_iql/configs/family_antmaze_finetune_config.py);
# locomotion: the learner's default beta range with IQL's locomotion expectile (no config released).
PRESETS = {
    "locomotion": dict(expectile=0.7, beta_min=1.0, beta_max=5.0),
    "antmaze": dict(expectile=0.9, beta_min=8.0, beta_max=14.0),
    "pointmaze": dict(expectile=0.9, beta_min=8.0, beta_max=14.0),
    "adroit": dict(expectile=0.7, beta_min=1.0, beta_max=5.0),  # no official values: the locomotion preset
    "kitchen": dict(expectile=0.7, beta_min=1.0, beta_max=5.0),  # no official values: the locomotion preset
}
# Refinements per (robot, level): none, the official code tunes per domain only.
DATASET_PRESETS: dict[tuple[str, str], dict] = {}
LOG_STD_MIN, LOG_STD_MAX = -5.0, 2.0  # universal policy (IQL's)
BALANCE_LOG_STD_MIN = -10.0  # balance model (the official NormalTanhPolicy default)
ACTION_EPS = 1e-5  # the official code clips dataset actions to +-(1 - 1e-5)
ENCODING_DIM, ENCODING_BASE = 6, 10_000.0
BETA_STATES = 10_000  # dataset states on which each evaluation reports the balance model's beta
PAPER_STEPS = (1_000_000, 1_000_000)
# The traced hyperparameters (Hyper): the beta range only maps the balance model's tanh and draws the
# offline betas, so it is traced too (each point's range is checked by validate).
SWEEPABLE = ("expectile", "discount", "tau", "beta_min", "beta_max", "target_entropy")


def resolve(args: Args, meta: Meta) -> Args:
    """Fill the None fields from the dataset's preset (domain, then robot and level); an explicit
    flag always wins."""
    preset = {**PRESETS[meta.domain], **DATASET_PRESETS.get((meta.robot, meta.level), {})}
    preset["eval_episodes"] = default_eval_episodes(meta.domain)
    args = dataclasses.replace(args, **{k: v for k, v in preset.items() if getattr(args, k) is None})
    validate(args)  # a flag given alone may cross the other end's preset
    return args


def validate(args: Args) -> None:
    for point in sweep_points(args.sweep, args, SWEEPABLE):  # each grid point's beta range
        lo, hi = point.get("beta_min", args.beta_min), point.get("beta_max", args.beta_max)
        if lo is not None and hi is not None and not lo < hi:
            raise UserError(f"--beta-min ({lo}) must be below --beta-max ({hi})")
    if args.init_temperature <= 0:
        raise UserError(f"--init-temperature must be positive, got {args.init_temperature}")


# --- Networks ---------------------------------------------------------------------------------
def default_init(scale: float = np.sqrt(2)):
    return nn.initializers.orthogonal(scale)


def sinusoidal_encoding(beta: jax.Array) -> jax.Array:
    """beta (...,) -> (..., 6): [sin(beta / n^(2i/d)), cos(beta / n^(2i/d))] for i = 0, 1, 2, with
    n = 10000 and d = 6, interleaved sin, cos (official sin_cos_skill_func)."""
    i = jnp.arange(ENCODING_DIM // 2)
    inner = beta[..., None] / ENCODING_BASE ** (2 * i / ENCODING_DIM)
    return jnp.stack([jnp.sin(inner), jnp.cos(inner)], -1).reshape(*beta.shape, ENCODING_DIM)


class MLP(nn.Module):
    dims: tuple[int, ...]
    activate_final: bool = False

    @nn.compact
    def __call__(self, x):
        for i, d in enumerate(self.dims):
            x = nn.Dense(d, kernel_init=default_init())(x)
            if i + 1 < len(self.dims) or self.activate_final:
                x = nn.relu(x)
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


class UniversalPolicy(nn.Module):
    """pi_u(a | s, beta): IQL's Gaussian (tanh on the mean only, state-independent log-std) on the
    state concatenated with beta's sinusoidal code."""

    hidden_dims: tuple[int, ...]
    action_dim: int

    @nn.compact
    def __call__(self, obs, beta):
        h = MLP(self.hidden_dims, activate_final=True)(jnp.concatenate([obs, sinusoidal_encoding(beta)], -1))
        mean = jnp.tanh(nn.Dense(self.action_dim, kernel_init=default_init())(h))
        log_std = self.param("log_std", nn.initializers.zeros, (self.action_dim,))
        return mean, jnp.clip(log_std, LOG_STD_MIN, LOG_STD_MAX)


class BalanceModel(nn.Module):
    """pi_b(beta | s): a 1-D Gaussian over u, squashed by tanh to x in (-1, 1); returns u's mean and
    (state-independent) log-std, each shaped like the batch."""

    hidden_dims: tuple[int, ...]

    @nn.compact
    def __call__(self, obs):
        h = MLP(self.hidden_dims, activate_final=True)(obs)
        mean = nn.Dense(1, kernel_init=default_init())(h)[..., 0]
        log_std = self.param("log_std", nn.initializers.zeros, (1,))
        return mean, jnp.broadcast_to(jnp.clip(log_std[0], BALANCE_LOG_STD_MIN, LOG_STD_MAX), mean.shape)


class TrainState(NamedTuple):
    """Everything one seed trains."""

    actor: dict  # the universal policy
    balance: dict
    log_temp: jax.Array  # the balance model's entropy temperature, log
    critic: dict
    target_critic: dict
    value: dict
    actor_opt: optax.OptState
    balance_opt: optax.OptState
    temp_opt: optax.OptState
    critic_opt: optax.OptState
    value_opt: optax.OptState


class Hyper(NamedTuple):
    """Numeric hyperparameters that do not change shapes, as float32 arrays (vmappable)."""

    expectile: jax.Array
    discount: jax.Array
    tau: jax.Array
    beta_min: jax.Array
    beta_max: jax.Array
    target_entropy: jax.Array


class Batch(NamedTuple):
    observations: jax.Array
    actions: jax.Array
    rewards: jax.Array
    next_observations: jax.Array
    masks: jax.Array  # 1 - terminal: truncation still bootstraps


# --- The signature terms ------------------------------------------------------------------------
def expectile_loss(diff: jax.Array, expectile: jax.Array) -> jax.Array:
    """|tau - 1(diff < 0)| * diff^2, elementwise; diff = Q(s, a) - V(s)."""
    weight = jnp.where(diff > 0, expectile, 1.0 - expectile)
    return weight * diff**2


def awr_weights(adv: jax.Array, beta: jax.Array, broadcast: bool = False) -> jax.Array:
    """exp(beta * advantage) with a per-sample beta, clipped at 100 as in the official code. With
    `broadcast`, what the official code computes: advantages (B,) times beta (B, 1) give a B x B matrix
    that its loss averages, so sample j's weight is the mean over the batch's betas."""
    if broadcast:
        return jnp.minimum(jnp.exp(beta[:, None] * adv[None, :]), 100.0).mean(0)
    return jnp.minimum(jnp.exp(beta * adv), 100.0)


def gaussian_log_prob(mean, log_std, action):
    return (-0.5 * ((action - mean) / jnp.exp(log_std)) ** 2 - log_std - 0.5 * jnp.log(2 * jnp.pi)).sum(-1)


def tanh_gaussian_log_prob(u, mean, log_std):
    """log-density of x = tanh(u), u ~ N(mean, std): the Gaussian's minus log(1 - tanh(u)^2), the
    latter as 2 * (log 2 - u - softplus(-2u)) so it stays finite where tanh(u) rounds to +-1."""
    log_det = 2.0 * (jnp.log(2.0) - u - jax.nn.softplus(-2.0 * u))
    return -0.5 * ((u - mean) / jnp.exp(log_std)) ** 2 - log_std - 0.5 * jnp.log(2 * jnp.pi) - log_det


def to_beta(x: jax.Array, hp: Hyper) -> jax.Array:
    """x in [-1, 1] -> beta in [beta_min, beta_max]."""
    return (x + 1.0) / 2.0 * (hp.beta_max - hp.beta_min) + hp.beta_min


def schedule_change(run_config: dict, args: Args, step: int) -> str | None:
    """What a resumed run's larger budget does to the universal policy's learning rate, when it changes the
    schedule the run followed so far: an offline-only run decays it by cosine over its --total-steps,
    a run with an online phase keeps it constant (see make_agent). None when nothing changes."""
    total, online = run_config.get("total_steps", args.total_steps), run_config.get("online_steps", 0)
    if online > 0 or (args.online_steps == 0 and args.total_steps == total):
        return None
    was = optax.cosine_decay_schedule(args.actor_lr, total)(step)
    if args.online_steps > 0:
        return (
            f"--online-steps {args.online_steps} on a run started offline-only: its {step} updates so far "
            f"decayed the universal policy's learning rate by cosine over {total} (now {was:.3g}); from here it is "
            f"constant at {args.actor_lr:g}, as in a run given an online phase from its start. "
            "No uninterrupted run has this schedule"
        )
    now = optax.cosine_decay_schedule(args.actor_lr, args.total_steps)(step)
    return (
        f"--total-steps {args.total_steps} on a run started with {total}: the universal policy's cosine schedule "
        f"now spans {args.total_steps} updates, so its learning rate at update {step} goes from {was:.3g} "
        f"to {now:.3g}. No uninterrupted run has this schedule"
    )


def make_agent(args: Args, obs_dim: int, action_dim: int):
    """init, update, act and balance_beta for one seed, closed over the architecture and optimizers."""
    actor, balance = UniversalPolicy(args.hidden_dims, action_dim), BalanceModel(args.hidden_dims)
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
    actor_tx, balance_tx, temp_tx = optax.adam(actor_lr), optax.adam(args.actor_lr), optax.adam(args.temp_lr)
    critic_tx, value_tx = optax.adam(args.critic_lr), optax.adam(args.value_lr)

    def init(key) -> TrainState:
        k_actor, k_balance, k_q1, k_q2, k_value = jax.random.split(key, 5)
        obs, act = jnp.zeros((1, obs_dim)), jnp.zeros((1, action_dim))
        actor_params = actor.init(k_actor, obs, jnp.zeros(1))
        balance_params = balance.init(k_balance, obs)
        log_temp = jnp.log(jnp.float32(args.init_temperature))
        # Two inits, then stacked: an init vmapped over the critics would batch the orthogonal
        # initializer's QR, which can deadlock jaxlib's LAPACK on CPU (see iql.py's train()).
        critic_params = jax.tree_util.tree_map(
            lambda a, b: jnp.stack([a, b]), critic.init(k_q1, obs, act), critic.init(k_q2, obs, act)
        )
        value_params = value.init(k_value, obs)
        return TrainState(
            actor_params,
            balance_params,
            log_temp,
            critic_params,
            jax.tree_util.tree_map(jnp.copy, critic_params),  # own buffers: the state is donated
            value_params,
            actor_tx.init(actor_params),
            balance_tx.init(balance_params),
            temp_tx.init(log_temp),
            critic_tx.init(critic_params),
            value_tx.init(value_params),
        )

    # Each loss takes the parameters it trains first; everything else it reads is frozen.
    def value_loss(value_params, target_critic, batch: Batch, hp: Hyper):
        q_t = jnp.minimum(*twin_q(target_critic, batch.observations, batch.actions))
        v = value.apply(value_params, batch.observations)
        loss = expectile_loss(q_t - v, hp.expectile).mean()
        return loss, {"value_loss": loss, "v_mean": v.mean()}

    def balance_loss(balance_params, actor_params, target_critic, log_temp, obs, key, hp: Hyper):
        """SAC through the frozen universal policy: x ~ pi_b(s) and a ~ pi_u(s, beta(x)), both
        reparameterized, L = mean(alpha * log pi_b(x | s) - min Qbar(s, a)). Only the balance
        model's parameters receive a gradient."""
        actor_params, target_critic, log_temp = jax.lax.stop_gradient((actor_params, target_critic, log_temp))
        k_beta, k_action = jax.random.split(key)
        mean, log_std = balance.apply(balance_params, obs)
        u = mean + jnp.exp(log_std) * jax.random.normal(k_beta, mean.shape)
        log_prob = tanh_gaussian_log_prob(u, mean, log_std)
        beta = to_beta(jnp.tanh(u), hp)
        a_mean, a_log_std = actor.apply(actor_params, obs, beta)
        action = a_mean + jnp.exp(a_log_std) * jax.random.normal(k_action, a_mean.shape)
        q = jnp.minimum(*twin_q(target_critic, obs, action))
        loss = (jnp.exp(log_temp) * log_prob - q).mean()
        entropy = -log_prob.mean()
        return loss, {"balance_loss": loss, "balance_entropy": entropy, "balance_beta_mean": beta.mean(),
                      "balance_beta_std": beta.std(), "balance_q": q.mean()}  # fmt: skip

    def temperature_loss(log_temp, entropy, hp: Hyper):
        """alpha * (H - H_target): alpha falls while the balance model's entropy is above target."""
        alpha = jnp.exp(log_temp)
        loss = alpha * (jax.lax.stop_gradient(entropy) - hp.target_entropy)
        return loss, {"temperature": alpha}

    def universal_policy_loss(actor_params, obs, actions, beta, adv):
        """Advantage-weighted regression with the per-sample beta as both the inverse temperature
        and the policy's input."""
        weights = awr_weights(adv, beta, args.official_weight_broadcast)
        mean, log_std = actor.apply(actor_params, obs, beta)
        loss = -(weights * gaussian_log_prob(mean, log_std, actions)).mean()
        return loss, {"actor_loss": loss, "weight_mean": weights.mean()}

    def critic_loss(critic_params, value_params, batch: Batch, hp: Hyper):
        target = batch.rewards + hp.discount * batch.masks * value.apply(value_params, batch.next_observations)
        q1, q2 = twin_q(critic_params, batch.observations, batch.actions)
        loss = ((q1 - target) ** 2 + (q2 - target) ** 2).mean()
        return loss, {"critic_loss": loss, "q_mean": q1.mean()}

    def policy_betas(balance_params, obs, key, hp: Hyper, online: bool):
        """The universal policy's beta per sample: uniform in the range offline, sampled from the
        balance model online (no gradient to it). `online` is static: one trace per phase."""
        if not online:
            return jax.random.uniform(key, obs.shape[:1], minval=hp.beta_min, maxval=hp.beta_max)
        mean, log_std = balance.apply(balance_params, obs)
        u = mean + jnp.exp(log_std) * jax.random.normal(key, mean.shape)
        return jax.lax.stop_gradient(to_beta(jnp.tanh(u), hp))

    def apply_grads(tx, params, opt_state, grads):
        upd, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, upd), opt_state

    def update(s: TrainState, batch: Batch, key, hp: Hyper, online: bool = False):
        k_balance, k_beta = jax.random.split(key)
        obs = batch.observations
        # 1. V by expectile regression on the target critic's Q of dataset actions.
        grads, m_value = jax.grad(value_loss, has_aux=True)(s.value, s.target_critic, batch, hp)
        value_params, value_opt = apply_grads(value_tx, s.value, s.value_opt, grads)
        # 2. The balance model through the frozen universal policy, then 3. its temperature.
        grads, m_balance = jax.grad(balance_loss, has_aux=True)(
            s.balance, s.actor, s.target_critic, s.log_temp, obs, k_balance, hp
        )
        balance_params, balance_opt = apply_grads(balance_tx, s.balance, s.balance_opt, grads)
        grads, m_temp = jax.grad(temperature_loss, has_aux=True)(s.log_temp, m_balance["balance_entropy"], hp)
        log_temp, temp_opt = apply_grads(temp_tx, s.log_temp, s.temp_opt, grads)
        # 4. The universal policy by AWR with the new V, beta uniform (offline) or from pi_b (online).
        beta = policy_betas(s.balance, obs, k_beta, hp, online)
        q_t = jnp.minimum(*twin_q(s.target_critic, obs, batch.actions))
        adv = q_t - value.apply(value_params, obs)
        grads, m_actor = jax.grad(universal_policy_loss, has_aux=True)(s.actor, obs, batch.actions, beta, adv)
        actor_params, actor_opt = apply_grads(actor_tx, s.actor, s.actor_opt, grads)
        # 5. Q bootstraps from the new V(s'); 6. Polyak averaging of the target critic.
        grads, m_critic = jax.grad(critic_loss, has_aux=True)(s.critic, value_params, batch, hp)
        critic_params, critic_opt = apply_grads(critic_tx, s.critic, s.critic_opt, grads)
        target_params = optax.incremental_update(critic_params, s.target_critic, hp.tau)
        state = TrainState(
            actor_params, balance_params, log_temp, critic_params, target_params, value_params,
            actor_opt, balance_opt, temp_opt, critic_opt, value_opt,
        )  # fmt: skip
        metrics = {**m_value, **m_balance, **m_temp, **m_actor, **m_critic, "adv_mean": adv.mean(),
                   "policy_beta_mean": beta.mean(), "policy_beta_std": beta.std()}  # fmt: skip
        return state, metrics

    def balance_beta(balance_params, obs, hp: Hyper):
        """The balance model's deterministic beta: tanh of its mean, mapped to the range."""
        return to_beta(jnp.tanh(balance.apply(balance_params, obs)[0]), hp)

    def act(params, obs, key, deterministic: bool, hp: Hyper, temperature=1.0):
        """params = (universal policy, balance model); beta is always the deterministic one."""
        actor_params, balance_params = params
        mean, log_std = actor.apply(actor_params, obs, balance_beta(balance_params, obs, hp))
        if deterministic:
            return jnp.clip(mean, -1.0, 1.0)
        noise = jax.random.normal(key, mean.shape) * jnp.exp(log_std) * temperature
        return jnp.clip(mean + noise, -1.0, 1.0)

    losses = dict(value_loss=value_loss, balance_loss=balance_loss, temperature_loss=temperature_loss,
                  universal_policy_loss=universal_policy_loss, critic_loss=critic_loss)  # fmt: skip
    return init, update, act, balance_beta, {**losses, "policy_betas": policy_betas}


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
    """A jitted scan of `num_updates` offline updates, vmapped over members; batches drawn inside the scan."""

    def one_seed(state, key, data, hp):
        def body(carry, _):
            state, key = carry
            key, k_batch, k_update = jax.random.split(key, 3)
            state, metrics = update(state, sample_batch(data, k_batch, batch_size), k_update, hp, online=False)
            return (state, key), metrics

        (state, key), metrics = jax.lax.scan(body, (state, key), None, length=num_updates)
        return state, key, metrics  # metrics: (num_updates,) each

    vmapped = vmap_members(one_seed, in_axes=(0, 0, None, 0))  # hp per member: the sweep's values are traced
    return jax.jit(vmapped, donate_argnums=(0,))


def beta_spread(betas_of, states: TrainState, obs: jax.Array, hp: Hyper) -> dict:
    """The balance model's deterministic beta on fixed dataset states, per member (`betas_of`: the jitted
    balance_beta vmapped over members): does it choose different balances for different states?"""
    betas = np.asarray(betas_of(states.balance, obs, hp))
    quantiles = np.percentile(betas, [5, 50, 95], axis=1)
    stats = {"mean": betas.mean(1), "std": betas.std(1), "min": betas.min(1), "p5": quantiles[0],
             "p50": quantiles[1], "p95": quantiles[2], "max": betas.max(1)}  # fmt: skip
    return {k: np.round(v, 4).tolist() for k, v in stats.items()}


# --- Online fine-tuning -----------------------------------------------------------------------
def make_online_step(update, act, batch_size: int, temperature: float):
    """One jitted call per environment step: store each seed's transition, update on a batch drawn
    uniformly from offline + online data (the official buffer is seeded with the dataset) with the
    universal policy's beta from the balance model, act."""

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
        state, metrics = update(state, batch, k_up, hp, online=True)
        action = act((state.actor, state.balance), next_obs, k_act, False, hp, temperature)
        return state, key, buf, action, metrics

    vmapped = vmap_members(one_seed, in_axes=(0, 0, 0, None, 0, 0, None, 0))
    return jax.jit(vmapped, donate_argnums=(0, 2))


def online_phase(args, meta, states, keys, offline, update, act, hp, logger, evaluate_all, reward_fn, seeds, ck=None):
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
        act_jit = jax.jit(jax.vmap(lambda p, o, k, h: act(p, o, k, False, h, args.exploration_temperature)))
        keys, k_act = jax.vmap(lambda k: tuple(jax.random.split(k)))(keys)
        actions = np.asarray(act_jit((states.actor, states.balance), obs, k_act, hp))
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
        states, keys, buf, actions, metrics = step_fn(
            states, keys, buf, t, transition, jnp.asarray(next_obs), offline, hp
        )
        actions, obs, t = np.asarray(actions), next_obs, t + 1
        logger.advance(1)
        if t % args.eval_every == 0 or t == args.online_steps:
            metrics = {k: np.asarray(v)[:, None] for k, v in jax.device_get(metrics).items()}
            bad = first_nonfinite(metrics, t - 1, seeds)
            if bad:
                logger.stop_nonfinite(bad, " in online training")
            logger.metrics(args.total_steps + t, metrics)
            evaluate_all(states, t, "online")
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
    init, update, act, balance_beta, _ = make_agent(args, meta.obs_dim, meta.action_dim)
    # Members: every seed of every --sweep point (one point without --sweep), sharded over devices.
    points = sweep_points(args.sweep, args, SWEEPABLE)
    hp = shard(member_hyper(Hyper, args, points, args.num_seeds))
    seeds = list(range(args.seed, args.seed + args.num_seeds))
    members = member_labels(points, seeds)
    keys = jnp.stack([jax.random.key(s) for s in seeds])
    init_keys, keys = jax.vmap(lambda k: tuple(jax.random.split(k)))(keys)
    # One jitted init per seed, stacked (no batched QR from a vmapped orthogonal init: see iql.py).
    init_one = jax.jit(init)
    states = jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *[init_one(k) for k in init_keys])
    states, keys = shard(tile(states, len(points))), shard(tile(keys, len(points)))

    logger = RunLogger("famo2o", args, meta, seeds=seeds, paper_steps=PAPER_STEPS, points=points)
    print(f"FamO2O on {args.dataset} ({meta.domain}, {meta.size} transitions): expectile {args.expectile}, "
          f"beta in ({args.beta_min}, {args.beta_max}), {args.eval_episodes} eval episodes"
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
    def policy(params, carry, obs, prev_reward, rng):  # obs: (members, episodes, obs_dim)
        return jax.vmap(lambda p, o, h: act(p, o, rng, True, h))(params, obs, hp), carry

    if args.eval_only:
        return logger.loaded(policy, (states.actor, states.balance))
    beta_obs = replicate(data.observations[:: max(1, meta.size // BETA_STATES)][:BETA_STATES])
    betas_of = jax.jit(jax.vmap(balance_beta, in_axes=(0, None, 0)))  # built once: compiled once

    def evaluate_all(states, step, phase):
        result = evaluate(meta, policy, (states.actor, states.balance), num_episodes=args.eval_episodes,
                          seed=args.seed, video=logger.video(step, phase))  # fmt: skip
        spread = beta_spread(betas_of, states, beta_obs, hp)
        logger.evaluation(step, result, phase=phase, extra={"beta": spread})
        x = args.total_steps + step if phase == "online" else step
        logger.scalars(x, {"beta/state_mean": np.mean(spread["mean"]), "beta/state_std": np.mean(spread["std"])})

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
            evaluate_all(states, step, "offline")
            logger.save_checkpoint(states, step, keys, "offline")
        print(f"offline: {args.total_steps} updates in {time.time() - t0:.0f} s, "
              f"normalized {logger.record['final']['normalized_mean']:.1f}", flush=True)  # fmt: skip
    if args.online_steps > 0 and not (phase == "online" and step >= args.online_steps):
        states = online_phase(
            args, meta, states, keys, offline, update, act, hp, logger, evaluate_all,
            lambda r: np.asarray(r, np.float32) * scale + shift, members, ck if phase == "online" else None,
        )  # fmt: skip
    record = logger.close()
    final = record["final"]
    print(f"final normalized score {final['normalized_mean']:.1f} ± {final['normalized_std']:.1f} "
          f"(seeds {seeds}); record: {logger.run_dir / 'record.json'}", flush=True)  # fmt: skip
    return record


if __name__ == "__main__":
    cli(Args, train, validate=validate)
