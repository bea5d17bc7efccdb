"""Decision Transformer: causality, padding, returns-to-go, segment sampling, the presets (the maze
return-to-go scale), the optimizer (optax's clip + AdamW against a hand computation), the
evaluation context window, one compile per run, learning on good episodes, the command line and
the run-directory contract (resume from the run's config, refused flags, finished runs)."""

import functools
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import flax.linen
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import tyro
from flax import serialization
from helpers import assert_policy_reloads, run_algorithm, snapshot  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "algorithms"))
import dt  # noqa: E402

# The short run: tiny model, a fast warmup, 300 updates, two evaluations of 5 episodes.
K = 10
SHORT = [
    "--context-len", str(K), "--embed-dim", "32", "--num-layers", "1", "--batch-size", "64",
    "--total-steps", "300", "--eval-every", "150", "--eval-episodes", "5",
    "--learning-rate", "1e-3", "--warmup-steps", "20", "--seed", "0",
]  # fmt: skip


# --- the model: causality and padding ---------------------------------------------------------
@functools.lru_cache
def tiny_model(context_len=6, batch=2, obs_dim=3, action_dim=2):
    """A jitted apply with random O(0.3) weights (GPT-2's 0.02 init makes every effect ~1e-5) and
    numpy inputs, so nothing but the forward pass compiles."""
    model = dt.DecisionTransformer(action_dim, 16, 2, 2, 50, 0.1)
    rng = np.random.default_rng(0)
    inputs = dict(
        states=rng.normal(size=(batch, context_len, obs_dim)).astype(np.float32),
        actions=rng.uniform(-1, 1, (batch, context_len, action_dim)).astype(np.float32),
        rtg=rng.uniform(size=(batch, context_len)).astype(np.float32),
        timesteps=np.broadcast_to(np.arange(context_len, dtype=np.int32) + 7, (batch, context_len)),
        mask=np.ones((batch, context_len), bool),
    )
    shapes = jax.eval_shape(model.init, jax.random.key(0), **inputs)
    params = jax.tree_util.tree_map(lambda x: (0.3 * rng.normal(size=x.shape)).astype(np.float32), shapes)
    return jax.jit(model.apply), params, inputs


def changed_at(inputs, name, steps, seed):
    """A copy of inputs where `name` takes fresh values at the given steps (all rows)."""
    x = inputs[name].copy()
    if name == "timesteps":
        x[:, steps] = (x[:, steps] + 11) % 50
    else:
        x[:, steps] += 1.0 + np.random.default_rng(seed).normal(size=x[:, steps].shape).astype(np.float32)
    return {**inputs, name: x}


@pytest.mark.parametrize("name", ["states", "actions", "rtg", "timesteps"])
def test_causal_changing_step_t_leaves_earlier_predictions(name):
    apply, params, inputs = tiny_model()
    base = apply(params, **inputs)
    for t in (0, 2, 5):
        out = apply(params, **changed_at(inputs, name, [t], t))
        np.testing.assert_allclose(out[:, :t], base[:, :t], atol=1e-6, err_msg=f"{name} at step {t}")
        # The test can fail: what step t's state token sees does move its prediction.
        if name == "actions":  # a_t comes after s_t: it reaches a_hat_{t+1} but not a_hat_t
            np.testing.assert_allclose(out[:, t], base[:, t], atol=1e-6)
            if t + 1 < out.shape[1]:
                assert np.abs(out[:, t + 1] - base[:, t + 1]).max() > 1e-4
        else:
            assert np.abs(out[:, t] - base[:, t]).max() > 1e-4, f"{name} at step {t} ignored"


def test_padding_mask_hides_padded_steps():
    apply, params, inputs = tiny_model()
    mask = np.array([[False, False, False, True, True, True], [False, True, True, True, True, True]])
    pad = [0, 1, 2]  # padded in row 0; row 1 only pads step 0, so steps 1-2 are real there
    padded = {**inputs, "mask": mask}
    base = apply(params, **padded)
    garbage = padded
    for i, name in enumerate(["states", "actions", "rtg", "timesteps"]):
        garbage = changed_at(garbage, name, pad, 10 + i)
    out = apply(params, **garbage)
    np.testing.assert_allclose(out[0, 3:], base[0, 3:], atol=1e-6)
    # Row 1's steps 1-2 are real and did change: its predictions there must move.
    assert np.abs(out[1, 1:] - base[1, 1:]).max() > 1e-4
    # Without the mask the same garbage reaches the real steps (so the assertion above can fail).
    unmasked = apply(params, **{**garbage, "mask": np.ones_like(mask)})
    ref = apply(params, **{**padded, "mask": np.ones_like(mask)})
    assert np.abs(unmasked[0, 3:] - ref[0, 3:]).max() > 1e-4


# --- data: returns-to-go and segments ----------------------------------------------------------
def test_block_equals_flax_attention_and_dense_layers_on_3d_tokens():
    """The block's fused query-key-value projection, hand-written attention and 2-D dense layers
    compute what flax's MultiHeadDotProductAttention and Dense on (B, T, C) tokens do (this file's
    earlier block), with the fused kernel split into flax's per-head query, key and value kernels."""
    import flax.linen as nn

    B, T, C, H = 2, 5, 8, 2

    class Reference(nn.Module):
        @nn.compact
        def __call__(self, x, mask):
            ln = lambda name: nn.LayerNorm(epsilon=1e-5, name=name)  # noqa: E731
            x = x + nn.MultiHeadDotProductAttention(H, name="attn")(ln("ln1")(x), mask=mask)
            return x + nn.Dense(C, name="fc_out")(nn.relu(nn.Dense(4 * C, name="fc")(ln("ln2")(x))))

    rng = np.random.default_rng(0)
    x = rng.normal(size=(B, T, C)).astype(np.float32)
    valid = np.array([[False, True, True, True, True], [True] * T])
    mask = np.asarray(nn.combine_masks(nn.make_causal_mask(valid), valid[:, None, None, :]))
    block = dt.Block(C, H, 0.1)
    shapes = jax.eval_shape(lambda: block.init(jax.random.key(0), x, mask, False))["params"]
    p = jax.tree_util.tree_map(lambda a: (0.3 * rng.normal(size=a.shape)).astype(np.float32), shapes)
    W, b = p["qkv"]["kernel"], p["qkv"]["bias"]
    cols = lambda i: slice(i * C, (i + 1) * C)  # noqa: E731
    split = {n: {"kernel": W[:, cols(i)].reshape(C, H, C // H), "bias": b[cols(i)].reshape(H, C // H)}
             for i, n in enumerate(["query", "key", "value"])}  # fmt: skip
    attn = {**split, "out": {"kernel": p["proj"]["kernel"].reshape(H, C // H, C), "bias": p["proj"]["bias"]}}
    ref = {"ln1": p["LayerNorm_0"], "ln2": p["LayerNorm_1"], "attn": attn, "fc": p["fc"], "fc_out": p["fc_out"]}
    expected = Reference().apply({"params": ref}, x, mask)
    out = block.apply({"params": p}, x, mask, False)
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)
    assert np.abs(np.asarray(expected) - x).max() > 0.1  # the block does change its input


def test_dropout_drops_the_rate_and_rescales_the_rest():
    """Hashed dropout: a fraction `rate` of the elements is zeroed, the others are scaled by
    1 / (1 - rate); neighbouring elements and masks of different keys are independent (a pair is
    dropped together with probability rate^2); the same key gives the same mask; a vmapped member
    gets the mask its key gives alone; off at evaluation."""
    x = jnp.ones((1000, 1000))
    drop = dt.Dropout(0.1)
    apply = jax.jit(lambda key: drop.apply({}, x, False, rngs={"dropout": key}))
    out = np.asarray(apply(jax.random.key(0)))
    zero = out == 0
    assert abs(zero.mean() - 0.1) < 0.002  # 1e6 draws: std 3e-4
    np.testing.assert_allclose(out[~zero], 1 / 0.9, rtol=1e-6)
    for a, b in [(zero[:, 1:], zero[:, :-1]), (zero[1:], zero[:-1])]:  # neighbours in a row, in a column
        assert abs((a & b).mean() - 0.01) < 0.001
    other = np.asarray(apply(jax.random.key(1))) == 0
    assert abs((zero & other).mean() - 0.01) < 0.001
    assert (np.asarray(apply(jax.random.key(0))) == out).all()
    members = np.asarray(jax.vmap(apply)(jnp.stack([jax.random.key(1), jax.random.key(0)])))
    assert (members[0] == 0).tolist() == other.tolist() and (members[1] == out).all()
    assert (np.asarray(drop.apply({}, x, True)) == 1).all()


def test_mix32_is_a_bijection_that_spreads_every_bit():
    """The hash behind the dropout masks: distinct inputs give distinct outputs (checked on 2^20
    consecutive ones) and flipping any one input bit flips about half of the output bits."""
    i = jnp.arange(2**20, dtype=jnp.uint32)
    h = np.asarray(dt.mix32(i))
    assert len(np.unique(h)) == 2**20
    for bit in range(32):
        flipped = np.asarray(dt.mix32(i ^ jnp.uint32(1 << bit))) ^ h
        assert 0.45 < np.unpackbits(flipped.view(np.uint8)).mean() < 0.55, bit


def test_layer_norm_is_torchs():
    """(x - mean) / sqrt(var + 1e-5) * scale + bias over the last axis, var the biased variance:
    torch's nn.LayerNorm with GPT-2's epsilon; the second token's variance (3.5e-6) is below eps, so
    flax's default eps (1e-6) would give another result."""
    x = np.array([[1.0, 2.0, 4.0, 7.0], [0.001, -0.002, 0.003, 0.0]], np.float32)
    params = {"params": {"scale": np.array([1.0, 2.0, 0.5, -1.0], np.float32), "bias": np.full(4, 0.1, np.float32)}}
    out = np.asarray(dt.LayerNorm().apply(params, x))
    centred = x - x.mean(-1, keepdims=True)
    expected = centred / np.sqrt((centred**2).mean(-1, keepdims=True) + 1e-5) * params["params"]["scale"] + 0.1
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-6)
    flax_default = np.asarray(flax.linen.LayerNorm().apply(params, x))
    assert np.abs(flax_default[1] - out[1]).max() > 0.05


def test_returns_to_go_of_hand_built_episodes():
    rewards = np.array([1.0, 2.0, 3.0, 10.0, -20.0, 5.0], np.float32)
    starts = np.array([1, 0, 0, 1, 0, 1], bool)  # episodes [1, 2, 3], [10, -20], [5]
    np.testing.assert_allclose(dt.returns_to_go(rewards, starts), [6.0, 5.0, 3.0, -10.0, -20.0, 5.0])


def test_segments_left_padded_and_within_one_episode():
    lengths = [7, 2, 12, 1]
    n = sum(lengths)
    starts = np.zeros(n, bool)
    starts[np.cumsum([0] + lengths[:-1])] = True
    rewards = np.arange(n, dtype=np.float32)
    data = SimpleNamespace(
        observations=np.random.default_rng(0).normal(size=(n, 3)).astype(np.float32),
        actions=np.stack([np.arange(n), np.zeros(n)], 1).astype(np.float32),  # action 0 = row index
        rewards=rewards,
        episode_starts=starts,
        timesteps=np.concatenate([np.arange(L) for L in lengths]).astype(np.int32),
    )
    segs, _, _ = dt.make_segments(data, rtg_scale=10.0, max_ep_len=5)
    ctx = 4
    sample = jax.jit(dt.sample_batch, static_argnums=(2, 3))
    b = jax.device_get(sample(segs, jax.random.key(0), 512, ctx))
    episode = np.cumsum(starts) - 1
    ends = np.cumsum(lengths)[episode]
    rtg = dt.returns_to_go(rewards, starts) / 10.0
    seen_starts = set()
    for row in range(512):
        m = b.mask[row]
        n_valid = int(m.sum())
        assert n_valid >= 1 and m[ctx - n_valid :].all() and not m[: ctx - n_valid].any()  # left padding
        idx = b.actions[row, m, 0].astype(int)
        first = idx[0]
        seen_starts.add(first)
        np.testing.assert_array_equal(idx, np.arange(first, first + n_valid))
        assert n_valid == min(ctx, ends[first] - first)  # stops at its episode's end, never crosses it
        np.testing.assert_allclose(b.rtg[row, m], rtg[idx], rtol=1e-6)
        np.testing.assert_array_equal(b.timesteps[row, m], np.minimum(data.timesteps[idx], 4))
        assert (b.actions[row, ~m] == dt.PAD_ACTION).all() and (b.rtg[row, ~m] == 0).all()
    assert seen_starts == set(range(n))  # every transition can start a segment


# --- presets: the return-to-go scale and target per dataset ------------------------------------
def fake_meta(domain, robot, level, returns, horizon=1000):
    return SimpleNamespace(
        domain=domain, robot=robot, level=level, episode_returns=np.asarray(returns, float),
        env_spec=SimpleNamespace(max_episode_steps=horizon),
    )  # fmt: skip


@pytest.mark.parametrize(
    "domain, robot, level, returns, expected",
    [
        # locomotion: the paper's scale 1000 and its target per robot, on every level
        ("locomotion", "hopper", "medium", [900.0, 3100.0], (1000.0, 3600.0, 10, 1000)),
        ("locomotion", "walker2d", "expert", [4500.0], (1000.0, 5000.0, 10, 1000)),
        ("locomotion", "halfcheetah", "medium-replay", [-300.0, 4000.0], (1000.0, 6000.0, 10, 1000)),
        ("locomotion", "ant", "medium", [250.0, 3000.0], (1000.0, 3000.0, 10, 1000)),  # no paper target
        # mazes: scale and target = the dataset's best return, so R_0 = 1; 100 episodes
        ("pointmaze", "pointmaze", "umaze-dense", [12.5, 43.25, 30.0], (43.25, 43.25, 100, 300)),
        ("antmaze", "antmaze", "umaze", [0.0, 1.0, 0.0], (1.0, 1.0, 100, 700)),
        ("antmaze", "antmaze", "large-play", [0.0, 0.0], (1.0, 0.0, 100, 1000)),  # no success: scale 1
    ],
)
def test_presets_by_domain_robot_and_level(domain, robot, level, returns, expected):
    horizon = {"pointmaze": 300, "antmaze": 700 if level == "umaze" else 1000}.get(domain, 1000)
    meta = fake_meta(domain, robot, level, returns, horizon)
    args = dt.resolve(dt.Args(), meta)
    assert (args.rtg_scale, args.target_return, args.eval_episodes, args.max_ep_len) == expected
    # An explicit flag always wins.
    given = dt.Args(rtg_scale=7.0, target_return=3.0, eval_episodes=4, max_ep_len=50)
    assert dt.resolve(given, meta) == given


@pytest.fixture(scope="module")
def small_dense_maze(make_module):
    """local/pointmaze/umaze-dense-v0 at the maze tests' small size (2k steps, seed 0, 2 reference
    episodes): under a second to build."""
    import maze

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(maze, "REF_EPISODES", 2)
        make_module.build("local/pointmaze/umaze-dense-v0", num_steps=2_000, seed=0)
    return "local/pointmaze/umaze-dense-v0"


def test_maze_rtg_scale_is_the_datasets_best_return(small_dense_maze):
    """On a real maze set the data's returns-to-go lie in [0, 1] and the evaluation starts at R_0 = 1,
    where the locomotion scale 1000 would squash them to < 0.05 (and the old scale 1 left them ~40)."""
    from common.data import load_dataset

    data, meta = load_dataset(small_dense_maze, to_device=False)
    args = dt.resolve(dt.Args(dataset=small_dense_maze), meta)
    best = float(meta.episode_returns.max())
    assert meta.domain == "pointmaze" and 10.0 < best < 300.0, best  # tens: neither 1 nor 1000
    assert args.rtg_scale == best and args.target_return == best
    assert args.eval_episodes == 100 and args.max_ep_len == 300
    segments, _, _ = dt.make_segments(data, args.rtg_scale, args.max_ep_len)
    rtg = np.asarray(segments.rtg)
    assert rtg.min() >= 0.0 and abs(rtg.max() - 1.0) < 1e-6
    ctx = dt.initial_context(1, 2, 4, meta.obs_dim, meta.action_dim, args.target_return, args.rtg_scale)
    np.testing.assert_allclose(ctx.rtg_now, 1.0, rtol=1e-6)


# --- the optimizer and the loss --------------------------------------------------------------------
def test_optimizer_matches_torch_clip_then_adamw_by_hand():
    """Four updates of a tiny parameter with fixed gradients (two clipped, two not, inside the
    warmup and after it) against torch's clip_grad_norm_ + AdamW written out in float64."""
    lr, wd, warmup, clip = 1e-2, 0.1, 3, 0.25
    hp = dt.Hyper(*map(jnp.float32, (lr, wd, warmup, clip)))
    params = {"w": np.array([0.5, -1.0, 2.0], np.float32), "b": np.array([[0.3, -0.2]], np.float32)}
    grads = [
        {"w": np.array([3.0, -4.0, 0.0]), "b": np.array([[1.0, 2.0]])},  # norm ~5.5: clipped
        {"w": np.array([0.05, 0.1, -0.02]), "b": np.array([[0.0, 0.1]])},  # norm ~0.15: not clipped
        {"w": np.array([-1.0, 0.5, 0.5]), "b": np.array([[0.0, 0.0]])},  # clipped
        {"w": np.array([0.01, 0.0, 0.02]), "b": np.array([[-0.03, 0.0]])},  # not clipped, after warmup
    ]

    def run(opt):
        @jax.jit
        def step(p, state, g):
            updates, state = opt.update(jax.tree_util.tree_map(jnp.float32, g), state, p)
            return optax.apply_updates(p, updates), state

        p, state = params, opt.init(params)
        for g in grads:
            p, state = step(p, state, g)
        return jax.device_get(p)

    ours = run(dt.make_optimizer(hp))
    # torch: clip_grad_norm_(c) scales by c / (norm + 1e-6) when that is < 1; AdamW decays
    # p *= 1 - lr_t * wd, then p -= lr_t * m_hat / (sqrt(v_hat) + eps); lr_t = lr * min((t + 1) / warmup, 1).
    p = {k: v.astype(np.float64) for k, v in params.items()}
    m = {k: np.zeros_like(v) for k, v in p.items()}
    v = {k: np.zeros_like(x) for k, x in p.items()}
    for t, g in enumerate(grads):
        norm = np.sqrt(sum((x**2).sum() for x in g.values()))
        scale = min(1.0, clip / (norm + 1e-6))
        lr_t = lr * min((t + 1) / warmup, 1.0)
        for k in p:
            gk = g[k] * scale
            m[k] = 0.9 * m[k] + 0.1 * gk
            v[k] = 0.999 * v[k] + 0.001 * gk**2
            m_hat, v_hat = m[k] / (1 - 0.9 ** (t + 1)), v[k] / (1 - 0.999 ** (t + 1))
            p[k] = p[k] * (1 - lr_t * wd) - lr_t * m_hat / (np.sqrt(v_hat) + 1e-8)
    for k in p:  # the 1e-6 of torch's clip is a ~4e-6 relative difference of the clipped steps
        np.testing.assert_allclose(ours[k], p[k], rtol=2e-5, atol=1e-7, err_msg=k)
    # The test can fail: L2 inside Adam (decay before the moments) lands elsewhere.
    coupled = optax.chain(
        optax.clip_by_global_norm(clip), optax.add_decayed_weights(wd), optax.adam(dt.warmup_schedule(hp))
    )
    assert np.abs(run(coupled)["w"] - p["w"]).max() > 1e-4


def test_weight_decay_reaches_every_parameter():
    """No mask, as torch's AdamW over model.parameters(): with zero gradients the first update is
    -lr/warmup * wd * p on every leaf, LayerNorm scales and biases included."""
    _, params, _ = tiny_model()
    hp = dt.Hyper(*map(jnp.float32, (1e-2, 0.5, 2, 0.25)))
    opt = dt.make_optimizer(hp)
    zeros = jax.tree_util.tree_map(jnp.zeros_like, params)
    updates, _ = jax.jit(opt.update)(zeros, opt.init(params), params)
    leaves = jax.tree_util.tree_leaves_with_path(params)
    assert any("LayerNorm" in jax.tree_util.keystr(path) for path, _ in leaves)
    for (path, p), u in zip(leaves, jax.tree_util.tree_leaves(updates)):
        np.testing.assert_allclose(u, -0.005 * 0.5 * p, rtol=1e-5, atol=1e-9, err_msg=jax.tree_util.keystr(path))


def test_action_loss_is_the_mse_on_real_steps_only():
    apply, params, inputs = tiny_model()
    model = dt.DecisionTransformer(2, 16, 2, 2, 50, 0.0)  # no dropout: training=True is deterministic
    loss_fn = jax.jit(lambda p, b: dt.action_loss(p, model, b, jax.random.key(0)))
    mask = np.array([[False, False, True, True, True, True], [True] * 6])
    batch = dt.Batch(inputs["states"], inputs["actions"], inputs["rtg"], inputs["timesteps"], mask)
    loss, metrics = loss_fn(params, batch)
    pred = np.asarray(apply(params, **{**inputs, "mask": mask}))  # the same weights, dropout off
    err = ((pred - inputs["actions"]) ** 2)[mask]  # (real steps, action_dim)
    np.testing.assert_allclose(loss, err.mean(), rtol=1e-5)
    assert metrics == {"action_mse": loss}
    # Padded steps carry no loss: changing their targets changes nothing.
    moved = batch._replace(actions=np.where(mask[..., None], batch.actions, 5.0).astype(np.float32))
    np.testing.assert_allclose(loss_fn(params, moved)[0], loss, rtol=1e-6)


@pytest.mark.parametrize(
    "flags, message",
    [
        (dict(context_len=0), "--context-len must be at least 1, got 0"),
        (dict(embed_dim=30, num_heads=4), "--embed-dim 30 must be divisible by --num-heads 4"),
        (dict(num_layers=0), "--num-layers must be at least 1, got 0"),
        (dict(num_heads=0), "--num-heads must be at least 1, got 0"),
        (dict(dropout=1.0), "--dropout must be in [0, 1), got 1.0"),
        (dict(warmup_steps=0), "--warmup-steps must be at least 1, got 0"),
        (dict(rtg_scale=0.0), "--rtg-scale must be a positive number, got 0.0"),
        (dict(target_return=float("nan")), "--target-return must be a finite number, got nan"),
    ],
)
def test_validate_names_the_flag(flags, message):
    from common.data import UserError

    dt.validate(dt.Args())  # the defaults pass
    with pytest.raises(UserError) as err:
        dt.validate(dt.Args(**flags))
    assert str(err.value) == message


# --- a short run from the command line ---------------------------------------------------------
@pytest.fixture(scope="module")
def short_run(pendulum_dataset, tmp_path_factory):
    """One CLI run on good pendulum episodes, with jax's compilation log on."""
    out = tmp_path_factory.mktemp("dt-runs")
    env = {**os.environ, "MINARI_DATASETS_PATH": os.environ["MINARI_DATASETS_PATH"], "JAX_LOG_COMPILES": "1"}
    cmd = [sys.executable, "algorithms/dt.py", "--dataset", pendulum_dataset, *SHORT, "--out-dir", str(out)]
    cmd.append("--no-log")
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    (run_dir,) = sorted((out / "dt").iterdir())
    record = json.loads((run_dir / "record.json").read_text())
    return SimpleNamespace(proc=proc, run_dir=run_dir, record=record)


def test_command_line_run_writes_record_and_checkpoint(short_run):
    lines = short_run.proc.stdout.splitlines()
    assert lines[0] == f"run directory: {short_run.run_dir}"
    # The resolved presets, each with where it came from, before training starts.
    presets = "rtg_scale 1000 (preset), target_return 100 (preset), eval_episodes 5 (flag), max_ep_len 100 (preset)"
    assert lines[1].startswith("DT on test/pendulum/pd-v0 (locomotion, pendulum/pd,"), lines[:3]
    assert lines[1].endswith(presets), lines[:3]
    rec = short_run.record
    assert rec["algorithm"] == "dt" and rec["tier"] == "short" and rec["seeds"] == [0]
    assert [e["step"] for e in rec["evaluations"]] == [150, 300]
    assert rec["finished"] is True
    cfg = rec["config"]
    assert cfg["context_len"] == K and cfg["embed_dim"] == 32 and cfg["num_layers"] == 1
    assert cfg["target_return"] == 100.0 and cfg["rtg_scale"] == 1000.0  # dataset max; locomotion scale
    assert cfg["eval_episodes"] == 5 and cfg["max_ep_len"] == 100  # config.json saves the resolved values
    config = json.loads((short_run.run_dir / "config.json").read_text())  # the record leaves out this machine's paths
    assert {k: v for k, v in config.items() if k not in ("out_dir", "resume", "eval_only")} == cfg
    assert (short_run.run_dir / "checkpoint.msgpack").exists()


def test_short_run_beats_random_on_good_episodes(short_run, pendulum_dataset):
    from common.data import load_dataset

    _, meta = load_dataset(pendulum_dataset)
    final = short_run.record["final"]
    mean_return = np.mean(short_run.record["evaluations"][-1]["returns"])
    # Measured: 100.0 (every episode balanced for the full 100 steps) at 150 and 300 updates. An
    # untrained model scores about 12 here, so DESIGN's margins (>= 10 over random, >= a quarter of
    # the data's mean return of ~72) alone would be weak: require 60.
    assert final["normalized_mean"] >= 60.0, final
    assert final["normalized_mean"] >= 10.0 and mean_return >= 0.25 * meta.episode_returns.mean()


def test_evaluation_and_training_compile_once(short_run):
    log = short_run.proc.stderr
    lengths = np.concatenate([np.ravel(e["lengths"]) for e in short_run.record["evaluations"]])
    assert lengths.max() > K  # episodes outlive the window, so the window really rolled
    assert log.count("Compiling jit(dt_policy)") == 1, "the evaluation policy recompiled"
    assert log.count("Compiling jit(one_seed)") == 1, "the training chunk recompiled"


def test_context_window_holds_last_steps_of_each_env(short_run, pendulum_dataset):
    """Seed 0 = the trained model (balances all 100 steps), seed 1 = the same with its action head
    zeroed (always pushes 0, so its episodes fall early, at different times); after t steps every
    env's window is exactly its own last min(t, K) steps."""
    from common.data import load_dataset
    from common.evaluation import evaluate

    data, meta = load_dataset(pendulum_dataset)
    args = dt.resolve(tyro.cli(dt.Args, args=["--dataset", pendulum_dataset, *SHORT]), meta)
    _, _, model = dt.make_agent(args, meta.obs_dim, meta.action_dim)
    raw = serialization.msgpack_restore((short_run.run_dir / "checkpoint.msgpack").read_bytes())
    params = raw["state"]["params"]  # stacked over seeds: (1, ...)
    params = jax.tree_util.tree_map(lambda x: np.concatenate([x, x]), params)
    for leaf in params["params"]["action_head"].values():
        leaf[1] = 0.0
    _, mean, std = dt.make_segments(data, args.rtg_scale, args.max_ep_len)
    policy = dt.make_policy(model, mean, std, args.rtg_scale, args.max_ep_len)
    calls = []

    def recording(p, carry, obs, prev_reward, rng):
        actions, carry = policy(p, carry, obs, prev_reward, rng)
        calls.append((np.asarray(obs), np.asarray(prev_reward), np.asarray(actions), jax.device_get(carry)))
        return actions, carry

    episodes = 3
    target, scale = args.target_return, args.rtg_scale
    carry = dt.initial_context(2, episodes, K, meta.obs_dim, meta.action_dim, target, scale)
    result = evaluate(meta, recording, params, num_episodes=episodes, seed=0, carry=carry)
    # Envs ended at different times, some before step 20 and some after step 25.
    lengths = result.lengths
    assert len(np.unique(lengths)) >= 3 and lengths.min() < 20 and lengths.max() > 25, lengths
    assert policy._cache_size() == 1
    obs = np.stack([c[0] for c in calls])  # (T, seeds, episodes, obs_dim)
    prev = np.stack([c[1] for c in calls]).astype(np.float64)
    acts = np.stack([c[2] for c in calls])
    rtg = target / scale - np.cumsum(prev, 0) / scale  # R_t = R_{t-1} - r_{t-1} / scale, r_{-1} = 0
    for t in (3, K, 20, 25):
        ctx = calls[t - 1][3]
        n = min(t, K)
        steps = np.arange(t - n, t)
        np.testing.assert_array_equal(ctx.t, t)
        np.testing.assert_array_equal(ctx.mask, np.broadcast_to(np.arange(K) >= K - n, ctx.mask.shape))
        np.testing.assert_array_equal(ctx.timesteps[..., K - n :], np.broadcast_to(steps, (2, episodes, n)))
        norm_obs = (obs[steps] - mean) / std  # (n, seeds, episodes, obs_dim)
        np.testing.assert_allclose(ctx.states[..., K - n :, :], np.moveaxis(norm_obs, 0, 2), atol=1e-5)
        np.testing.assert_allclose(ctx.actions[..., K - n :, :], np.moveaxis(acts[steps], 0, 2), atol=1e-6)
        np.testing.assert_allclose(ctx.rtg[..., K - n :], np.moveaxis(rtg[steps], 0, 2), rtol=1e-5, atol=1e-6)
        assert not ctx.states[..., : K - n, :].any() and not ctx.actions[..., : K - n, :].any()


def copy_run(run_dir: Path, dest: Path) -> Path:
    dest.mkdir()
    for name in ("record.json", "checkpoint.msgpack", "config.json"):
        (dest / name).write_bytes((run_dir / name).read_bytes())
    return dest


def run_cli(*flags, timeout=600):
    return run_algorithm("dt", *flags, timeout=timeout)


def test_resume_alone_continues_from_the_runs_config_as_if_uninterrupted(short_run, pendulum_dataset, tmp_path):
    """A run of 150 updates with non-default flags (dataset, sizes, schedule), then `--resume RUN_DIR`
    with only a larger budget (and --no-log): its config.json supplies every other flag, the step
    counter and the record carry on, and the result is the uninterrupted 300-update run's,
    evaluations and weights."""
    out = tmp_path / "runs"
    flags = list(SHORT)
    flags[flags.index("--total-steps") + 1] = "150"
    first = run_cli("--dataset", pendulum_dataset, *flags, "--out-dir", out, "--no-log")
    assert first.returncode == 0, first.stderr[-4000:]
    (run_dir,) = (out / "dt").iterdir()
    proc = run_cli("--resume", run_dir, "--total-steps", 300, "--no-log")
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "resumed from step 150" in proc.stdout
    assert "DT on test/pendulum/pd-v0" in proc.stdout  # not the default local/hopper/medium-v0
    record = json.loads((run_dir / "record.json").read_text())
    assert record["dataset"] == pendulum_dataset and record["finished"] is True
    assert [e["step"] for e in record["evaluations"]] == [150, 300]
    for ours, theirs in zip(record["evaluations"], short_run.record["evaluations"], strict=True):
        assert (ours["returns"], ours["lengths"]) == (theirs["returns"], theirs["lengths"])
    config = json.loads((run_dir / "config.json").read_text())
    assert config == {**short_run.record["config"], "out_dir": str(out), "resume": str(run_dir), "eval_only": None}
    restored = serialization.msgpack_restore((run_dir / "checkpoint.msgpack").read_bytes())
    uninterrupted = serialization.msgpack_restore((short_run.run_dir / "checkpoint.msgpack").read_bytes())
    assert int(restored["step"]) == 300
    same = jax.tree_util.tree_map(np.array_equal, restored["state"], uninterrupted["state"])
    assert all(jax.tree_util.tree_leaves(same))
    np.testing.assert_array_equal(restored["rng"], uninterrupted["rng"])


def test_resume_with_a_different_flag_is_refused_and_changes_nothing(short_run, tmp_path):
    run_dir = copy_run(short_run.run_dir, tmp_path / "run")
    before = snapshot(run_dir)
    t0 = time.time()
    proc = run_cli("--resume", run_dir, "--embed-dim", 64, "--total-steps", 450)
    assert proc.returncode != 0
    err = proc.stderr.strip().splitlines()
    assert len(err) == 1 and "--embed-dim 64 differs from the run's 32" in err[0], proc.stderr
    assert "Traceback" not in proc.stderr and "DT on" not in proc.stdout  # refused before loading data
    assert time.time() - t0 < 60
    assert snapshot(run_dir) == before


def test_finished_run_resumed_says_so_and_changes_nothing(short_run, tmp_path):
    run_dir = copy_run(short_run.run_dir, tmp_path / "run")
    before = snapshot(run_dir)
    proc = run_cli("--resume", run_dir)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "the run is finished (300 updates)" in proc.stdout and "DT on" not in proc.stdout
    assert snapshot(run_dir) == before


def test_bad_dt_flag_is_one_line_and_leaves_no_folder(tmp_path):
    out = tmp_path / "runs"
    proc = run_cli("--embed-dim", 30, "--num-heads", 4, "--out-dir", out)
    assert proc.returncode == 1
    assert proc.stderr.strip() == "error: --embed-dim 30 must be divisible by --num-heads 4"
    assert not out.exists()


def test_policy_reloads_from_the_run_directory(short_run):
    """`load_policy` (what --eval-only uses) rebuilds the policy and reproduces the last evaluation."""
    assert_policy_reloads(short_run.run_dir)


def test_a_sweep_point_equals_the_plain_run_with_its_learning_rate(pendulum_dataset, tmp_path):
    """--sweep learning-rate=3e-4,1e-3 with 2 seeds: members 2-3 (point 1, seeds 0-1) end exactly where
    seeds 0-1 of a plain run at learning rate 1e-3 end (same init, keys and batches; only the traced
    hyperparameter differs). The plain run has 4 seeds, so both runs have 4 members and compile once."""
    # No dropout: a smaller program to compile (the keys still draw every member's segments).
    tiny = dict(dataset=pendulum_dataset, context_len=K, embed_dim=32, num_layers=1, batch_size=32, dropout=0.0,
                total_steps=50, eval_every=50, eval_episodes=2, warmup_steps=20, no_log=True)  # fmt: skip
    sweep = ("learning_rate=3e-4,1e-3",)
    record = dt.train(dt.Args(out_dir=str(tmp_path / "sweep"), num_seeds=2, sweep=sweep, **tiny))
    dt.train(dt.Args(out_dir=str(tmp_path / "plain"), num_seeds=4, learning_rate=1e-3, **tiny))

    (sweep_dir,), (plain_dir,) = (tmp_path / "sweep" / "dt").iterdir(), (tmp_path / "plain" / "dt").iterdir()
    swept, alone = (serialization.msgpack_restore((d / "checkpoint.msgpack").read_bytes())["state"]
                    for d in (sweep_dir, plain_dir))  # fmt: skip
    for a, b in zip(jax.tree_util.tree_leaves(swept), jax.tree_util.tree_leaves(alone), strict=True):
        assert np.shape(a)[0] == 4  # members: 2 points x 2 seeds
        np.testing.assert_allclose(np.asarray(a)[2:4], np.asarray(b)[:2], atol=2e-4, rtol=2e-3)
    points = [{"learning_rate": 3e-4}, {"learning_rate": 1e-3}]
    assert [p["point"] for p in record["final_per_point"]] == points and record["sweep"]["points"] == points
    assert np.shape(record["evaluations"][-1]["returns"]) == (4, 2)  # one context window per member's episode
    assert_policy_reloads(sweep_dir)  # --eval-only: the checkpoint fits the tiled states, a window per member
