"""IQL's update here against JAX-CORL's, side by side in one process on the same machine.

    git clone https://github.com/nissymori/JAX-CORL /tmp/JAX-CORL
    pip install distrax omegaconf        # what JAX-CORL's iql.py imports (not dependencies of jaxorl)
    python results/peer_benchmark.py --jax-corl /tmp/JAX-CORL

Nothing of JAX-CORL is in this repository: its `algos/iql.py` is loaded from the given clone, with
its unused imports (d4rl, gym, wandb) stubbed, and its own `IQL.update_n_times` (8 updates unrolled
per jit call, batches sampled inside) is timed with its defaults: twin critics as one nn.vmap'd
module, layer norm on V, batch 256, 256-256 networks. This repository's update runs as `iql.py`
trains: `make_train_chunk`'s lax.scan of updates for one seed, and one jitted call per update.
Both train on the same random arrays of HalfCheetah's shapes (17-D observations, 6-D actions, 1M
transitions) resident on the device. Rounds alternate between the two so that load drifts hit both.
Writes results/throughput/peer_iql__<device>.json (on a CPU, named for its vector instructions too:
peer_iql__cpu-avx2.json, since the ratio differs between machine kinds); `python results/benchmark.py
--table` shows it.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import time
import types
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from benchmark import commit_of_code, cpu_model, file_device  # noqa: E402

from common.logging import atomic_write, device_name  # noqa: E402

OUT = REPO / "results" / "throughput"
OBS_DIM, ACTION_DIM, ROWS, BATCH = 17, 6, 1_000_000, 256


def load_module(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def load_jax_corl(clone: Path):
    """JAX-CORL's algos/iql.py as a module: its d4rl/gym/wandb imports serve only its __main__."""
    for name in ("d4rl", "gym", "wandb"):
        sys.modules.setdefault(name, types.ModuleType(name))
    sys.modules["gym"].Env = object  # a type annotation at import time
    argv, sys.argv = sys.argv, sys.argv[:1]  # OmegaConf.from_cli() reads the command line at import
    xla_flags = os.environ.get("XLA_FLAGS")
    try:
        return load_module("jax_corl_iql", clone / "algos" / "iql.py")
    finally:
        sys.argv = argv
        if xla_flags is None:  # it sets a GPU-only XLA flag at import; leave ours as they were
            os.environ.pop("XLA_FLAGS", None)
        else:
            os.environ["XLA_FLAGS"] = xla_flags


def random_fields():
    rng = np.random.default_rng(0)
    return (
        rng.normal(size=(ROWS, OBS_DIM)).astype(np.float32),
        rng.uniform(-0.99, 0.99, (ROWS, ACTION_DIM)).astype(np.float32),
        rng.normal(size=ROWS).astype(np.float32),
        rng.normal(size=(ROWS, OBS_DIM)).astype(np.float32),
        np.zeros(ROWS, np.float32),  # terminals
    )


def peer_runner(peer, fields):
    obs, act, rew, next_obs, term = (jnp.asarray(x) for x in fields)
    dataset = peer.Transition(obs, act, rew, next_obs, term, term)
    config = peer.IQLConfig(batch_size=BATCH, max_steps=1_000_000)
    state = peer.create_iql_train_state(jax.random.PRNGKey(0), obs[0], act[0], config)
    update = jax.jit(peer.IQL.update_n_times, static_argnums=(3,))
    n = config.n_jitted_updates
    key = jax.random.PRNGKey(1)

    def run(calls: int):
        nonlocal state, key
        for _ in range(calls):
            key, sub = jax.random.split(key)
            state, info = update(state, dataset, sub, config)
        jax.block_until_ready(info)

    return run, n, f"JAX-CORL algos/iql.py IQL.update_n_times ({n} updates per jit call)"


def ours_scan_runner(iql, fields, chunk: int):
    obs, act, rew, next_obs, term = (jnp.asarray(x) for x in fields)
    data = iql.Batch(obs, act, rew, next_obs, 1.0 - term)
    args = iql.Args(total_steps=1_000_000, dropout=0.0, batch_size=BATCH)
    init, update, _ = iql.make_agent(args, OBS_DIM, ACTION_DIM)
    hp = iql.Hyper(*(jnp.full((1,), x, jnp.float32) for x in (0.7, 3.0, 0.99, 0.005)))
    states = jax.tree_util.tree_map(lambda x: x[None], jax.jit(init)(jax.random.key(0)))
    keys = jax.random.key(1)[None]
    train_chunk = iql.make_train_chunk(update, BATCH, chunk)

    def run(calls: int):
        nonlocal states, keys
        for _ in range(calls):
            states, keys, metrics = train_chunk(states, keys, data, hp)
            jax.device_get(metrics)  # as train() does after every chunk

    return run, chunk, f"iql.py make_train_chunk (lax.scan of {chunk} updates, 1 seed)"


def ours_plain_runner(iql, fields):
    obs, act, rew, next_obs, term = (jnp.asarray(x) for x in fields)
    data = iql.Batch(obs, act, rew, next_obs, 1.0 - term)
    args = iql.Args(total_steps=1_000_000, dropout=0.0, batch_size=BATCH)
    init, update, _ = iql.make_agent(args, OBS_DIM, ACTION_DIM)
    hp = iql.Hyper(*(jnp.float32(x) for x in (0.7, 3.0, 0.99, 0.005)))

    @jax.jit
    def step(state, key):
        key, k_batch, k_update = jax.random.split(key, 3)
        state, metrics = update(state, iql.sample_batch(data, k_batch, BATCH), k_update, hp)
        return state, key, metrics["critic_loss"]

    state, key = jax.jit(init)(jax.random.key(0)), jax.random.key(1)

    def run(calls: int):
        nonlocal state, key
        for _ in range(calls):
            state, key, loss = step(state, key)
        loss.block_until_ready()

    return run, 1, "iql.py update, one jitted call per update"


def git_commit(clone: Path) -> str:
    try:
        out = subprocess.run(["git", "-C", str(clone), "rev-parse", "HEAD"], capture_output=True, text=True)
        return out.stdout.strip() or "unknown"
    except OSError:
        return "unknown"


def retyped(argv: list[str]) -> list[str]:
    """The command line with the clone's machine path replaced by its name."""
    out = []
    for i, arg in enumerate(argv):
        if i > 0 and argv[i - 1] == "--jax-corl":
            arg = "JAX-CORL"
        elif arg.startswith("--jax-corl="):
            arg = "--jax-corl=JAX-CORL"
        out.append(arg)
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--jax-corl", type=Path, required=True, help="a clone of github.com/nissymori/JAX-CORL")
    p.add_argument("--jax-corl-commit", default=None, help="its commit, when the path is not a git checkout")
    p.add_argument("--updates", type=int, default=4000, help="timed updates per runner and round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--chunk", type=int, default=500, help="updates per lax.scan call (iql.py's default eval chunk)")
    a = p.parse_args()
    if not (a.jax_corl / "algos" / "iql.py").is_file():
        sys.exit(f"error: {a.jax_corl}/algos/iql.py not found; pass a clone of github.com/nissymori/JAX-CORL")
    try:
        peer = load_jax_corl(a.jax_corl)
    except ImportError as e:
        sys.exit(f"error: JAX-CORL's iql.py needs {e.name}: pip install distrax omegaconf")
    iql = load_module("iql", REPO / "algorithms" / "iql.py")
    fields = random_fields()
    runners = {
        "jax_corl": peer_runner(peer, fields),
        "jaxorl_scan": ours_scan_runner(iql, fields, a.chunk),
        "jaxorl_plain": ours_plain_runner(iql, fields),
    }
    rates: dict[str, list[float]] = {name: [] for name in runners}
    for name, (run, per_call, _) in runners.items():
        t0 = time.perf_counter()
        run(1)  # compile
        print(f"{name}: compiled and ran {per_call} updates in {time.perf_counter() - t0:.1f} s", flush=True)
    for r in range(a.rounds):
        for name, (run, per_call, _) in runners.items():
            calls = max(1, a.updates // per_call)
            t0 = time.perf_counter()
            run(calls)
            rates[name].append(round(calls * per_call / (time.perf_counter() - t0), 1))
        print(f"round {r + 1}: " + ", ".join(f"{k} {v[-1]} updates/s" for k, v in rates.items()), flush=True)
    ratios = [round(s / c, 3) for s, c in zip(rates["jaxorl_scan"], rates["jax_corl"], strict=True)]
    result = {
        "comparison": "iql",
        "device": device_name(),
        **({"cpu": cpu_model()} if device_name() == "cpu" else {}),
        "jax_version": jax.__version__,
        "cpu_count": os.cpu_count(),
        "date": time.strftime("%Y-%m-%d"),
        "commit": commit_of_code(),
        "command": ["results/peer_benchmark.py", *retyped(sys.argv[1:])],
        "peer": {
            "repository": "github.com/nissymori/JAX-CORL",
            "file": "algos/iql.py",
            "commit": a.jax_corl_commit or git_commit(a.jax_corl),
        },  # fmt: skip
        "data": f"random arrays, {ROWS} transitions, {OBS_DIM}-D observations, {ACTION_DIM}-D actions (HalfCheetah)",
        "batch_size": BATCH,
        "updates_per_round": a.updates,
        "runners": {name: desc for name, (_, _, desc) in runners.items()},
        "updates_per_s": rates,
        "ratio_scan_over_jax_corl": ratios,
    }
    atomic_write(OUT / f"peer_iql__{file_device(result)}.json", json.dumps(result, indent=1) + "\n")
    print(f"jaxorl scan / JAX-CORL per round: {ratios}")


if __name__ == "__main__":
    main()
