"""Decision Transformer: causality, padding, returns-to-go, segment sampling, the evaluation context
window, one compile per run, learning on good episodes, and the command line."""

import functools
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import jax
import numpy as np
import pytest
import tyro
from flax import serialization

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
    rec = short_run.record
    assert rec["algorithm"] == "dt" and rec["tier"] == "short" and rec["seeds"] == [0]
    assert [e["step"] for e in rec["evaluations"]] == [150, 300]
    cfg = rec["config"]
    assert cfg["context_len"] == K and cfg["embed_dim"] == 32 and cfg["num_layers"] == 1
    assert cfg["target_return"] == 100.0 and cfg["rtg_scale"] == 1000.0  # dataset max; locomotion scale
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


def test_resume_continues_from_the_checkpoint(short_run, pendulum_dataset, tmp_path):
    """A record too long for one sitting continues with --resume: same run directory, the step
    counter and the record carry on, and the checkpoint moves to the new step."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    for name in ("record.json", "checkpoint.msgpack", "config.json"):
        (run_dir / name).write_bytes((short_run.run_dir / name).read_bytes())
    flags = list(SHORT)
    flags[flags.index("--total-steps") + 1] = "450"
    cmd = [sys.executable, "algorithms/dt.py", "--dataset", pendulum_dataset, *flags, "--no-log"]
    proc = subprocess.run(
        [*cmd, "--resume", str(run_dir)], cwd=REPO, capture_output=True, text=True, timeout=600,
        env={**os.environ, "MINARI_DATASETS_PATH": os.environ["MINARI_DATASETS_PATH"]},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "resumed from step 300" in proc.stdout
    record = json.loads((run_dir / "record.json").read_text())
    assert [e["step"] for e in record["evaluations"]] == [150, 300, 450]
    assert record["evaluations"][:2] == short_run.record["evaluations"]
    restored = serialization.msgpack_restore((run_dir / "checkpoint.msgpack").read_bytes())
    assert int(restored["step"]) == 450
