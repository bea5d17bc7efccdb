"""Throughput of an algorithm's full-size update: the file's own jitted `lax.scan` of updates,
vmapped over 1, 4 and 16 seeds and over a 3 x 3 hyperparameter sweep x 3 seeds (its --sweep path),
against a plain hand-written jitted single-seed loop (one jitted call per update from Python, as
CleanRL-style code does) measured in the same run. Also: the update's FLOPs from XLA's cost
analysis, the machine's measured float32 matmul peak, and the fraction of it each configuration
achieves.

    python results/benchmark.py --algo iql          # writes results/throughput/iql__<device>.json
                                                    # (<device>: cpu-avx2, cpu-avx-512 or the GPU)
    python results/benchmark.py --algo dt --matmuls # the update's matmuls, each shape timed alone
    python results/benchmark.py --eval              # evaluation: episodes and env steps/s (eval__<device>.json)
    python results/benchmark.py --table             # regenerates results/throughput/README.md

Data are random arrays of a locomotion dataset's shapes (hopper: 11-D observations, 3-D actions)
already on the device, so only the update is timed. Run it on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import importlib.util
import json
import math
import os
import re
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from common.logging import atomic_write, device_name, git_state  # noqa: E402

OUT = REPO / "results" / "throughput"
OBS_DIM, ACTION_DIM, ROWS = 11, 3, 200_000


def load_algorithm(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "algorithms" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the file executes
    spec.loader.exec_module(module)
    return module


class Setup(NamedTuple):
    init: Callable  # key -> one seed's train state
    update: Callable  # (state, batch, key, hp) -> (state, metrics)
    data: Any  # device-resident arrays of a locomotion dataset's shapes
    hp: Any
    sample: Callable  # (data, key) -> batch, inside jit
    make_chunk: Callable  # num_updates -> the file's jitted scan x vmap (states, keys, data, hp)
    network: str


def random_transitions(batch_cls, extra: int = 0):
    rng = np.random.default_rng(0)
    fields = [
        rng.normal(size=(ROWS, OBS_DIM)),
        rng.uniform(-0.99, 0.99, (ROWS, ACTION_DIM)),
        rng.normal(size=ROWS),
        rng.normal(size=(ROWS, OBS_DIM)),
        np.ones(ROWS),
    ] + [rng.normal(size=ROWS) for _ in range(extra)]
    return batch_cls(*(jnp.asarray(x, jnp.float32) for x in fields))


# What `resolve` reads of a dataset: the presets of local/hopper/medium-v0 (full-size networks).
HOPPER_MEDIUM = SimpleNamespace(domain="locomotion", robot="hopper", level="medium")


def per_member(chunk: Callable) -> Callable:
    """A file's chunk takes hyperparameters per member (--sweep): scalars are given to every member."""

    def run(states, keys, data, hp):
        return chunk(states, keys, data, jax.tree_util.tree_map(lambda x: jnp.broadcast_to(x, keys.shape[:1]), hp))

    return run


def sweep_hyper(hp, names: tuple[str, ...], num_seeds: int):
    """A 3 x 3 grid over the first two sweepable hyperparameters (0.9x, 1x, 1.1x each), x seeds; 9
    values (0.8x to 1.2x) of the only one where a file has one."""
    if len(names) == 1:
        a, b = names[0], None
        points = [(x, 1.0) for x in np.linspace(0.8, 1.2, 9)]
    else:
        a, b = names[:2]
        points = [(x, y) for x in (0.9, 1.0, 1.1) for y in (0.9, 1.0, 1.1)]

    def column(name):
        value = getattr(hp, name)
        scale = [x if name == a else y if name == b else 1.0 for x, y in points for _ in range(num_seeds)]
        return jnp.asarray(scale, jnp.float32) * value

    return type(hp)(*(column(name) for name in type(hp)._fields)), f"{a} x {b}, 3 x 3" if b else f"{a}, 9 values"


def iql_setup(module, batch_size: int) -> Setup:
    args = module.Args(total_steps=1_000_000, dropout=0.0, batch_size=batch_size)
    init, update, _ = module.make_agent(args, OBS_DIM, ACTION_DIM)
    hp = module.Hyper(*(jnp.float32(x) for x in (0.7, 3.0, 0.99, 0.005)))
    return Setup(
        init, update, random_transitions(module.Batch), hp,
        lambda data, key: module.sample_batch(data, key, batch_size),
        lambda n: per_member(module.make_train_chunk(update, batch_size, n)),
        "actor and critics 256-256 (paper size)",
    )  # fmt: skip


def famo2o_setup(module, batch_size: int) -> Setup:
    """The offline update (beta uniform); the online one differs only in drawing beta from the balance model."""
    args = module.resolve(module.Args(total_steps=1_000_000, batch_size=batch_size), HOPPER_MEDIUM)
    init, update, *_ = module.make_agent(args, OBS_DIM, ACTION_DIM)
    hp = module.Hyper(*(jnp.float32(x) for x in (args.expectile, args.discount, args.tau, args.beta_min,
                                                 args.beta_max, args.target_entropy)))  # fmt: skip
    return Setup(
        init, update, random_transitions(module.Batch), hp,
        lambda data, key: module.sample_batch(data, key, batch_size),
        lambda n: per_member(module.make_train_chunk(update, batch_size, n)),
        "universal policy, balance model and critics 256-256 (paper size)",
    )  # fmt: skip


def cql_setup(module, batch_size: int) -> Setup:
    """CQL and Cal-QL (the offline update: Cal-QL's online updates are the same update on a mixed batch)."""
    args = module.resolve(module.Args(batch_size=batch_size), HOPPER_MEDIUM)
    init, update, _ = module.make_agent(args, OBS_DIM, ACTION_DIM)
    zeros, ones = jnp.zeros(OBS_DIM), jnp.ones(OBS_DIM)
    calql = module.__name__ == "cal_ql"
    sample = lambda data, key: module.sample_batch(data, key, batch_size)  # noqa: E731
    make_chunk = lambda n: per_member(module.make_train_chunk(update, sample, n, None))  # noqa: E731
    return Setup(
        lambda key: init(key, zeros, ones), update, random_transitions(module.Batch, extra=int(calql)),
        module.make_hyper(args, ACTION_DIM), sample, make_chunk,
        f"actor {'-'.join(map(str, args.hidden_dims))}, twin critics {'-'.join(map(str, args.critic_hidden_dims))}, "
        f"{args.cql_n_actions} sampled actions x 3 (paper size)",
    )  # fmt: skip


def dt_setup(module, batch_size: int) -> Setup:
    args = module.Args(batch_size=batch_size, max_ep_len=1000, rtg_scale=1000.0, target_return=3600.0)
    init, update, _ = module.make_agent(args, OBS_DIM, ACTION_DIM)
    rng = np.random.default_rng(0)
    lengths = np.full(ROWS // 1000, 1000)
    ends = np.repeat(np.cumsum(lengths), lengths)
    data = module.Segments(
        jnp.asarray(rng.normal(size=(ROWS, OBS_DIM)), jnp.float32),
        jnp.asarray(rng.uniform(-1, 1, (ROWS, ACTION_DIM)), jnp.float32),
        jnp.asarray(rng.uniform(0, 3.6, ROWS), jnp.float32),
        jnp.asarray(np.tile(np.arange(1000), ROWS // 1000), jnp.int32),
        jnp.asarray(ends, jnp.int32),
        jnp.zeros(OBS_DIM, jnp.float32),
    )
    hp = module.Hyper(*map(jnp.float32, (args.learning_rate, args.weight_decay, args.warmup_steps, args.grad_clip)))
    return Setup(
        lambda key: init(key, hp), update, data, hp,
        lambda data, key: module.sample_batch(data, key, batch_size, args.context_len),
        lambda n: per_member(module.make_train_chunk(update, batch_size, args.context_len, n)),
        f"GPT {args.num_layers} layers, {args.embed_dim} embedding, {args.num_heads} head, K {args.context_len} "
        "(paper size)",
    )  # fmt: skip


def bc_setup(module, batch_size: int) -> Setup:
    args = module.Args(batch_size=batch_size)
    init, update, _ = module.make_agent(args, OBS_DIM, ACTION_DIM)
    full = random_transitions(lambda *fields: fields)
    data = module.Batch(full[0], full[1])
    hp = module.Hyper(jnp.float32(args.lr))

    def sample(data, key):
        idx = jax.random.randint(key, (batch_size,), 0, ROWS)
        return jax.tree_util.tree_map(lambda x: x[idx], data)

    return Setup(
        lambda key: init(key, jnp.zeros(OBS_DIM), jnp.ones(OBS_DIM)), lambda s, b, k, hp: update(s, b, hp), data,
        hp, sample, lambda n: per_member(module.make_train_chunk(update, batch_size, n)),
        f"actor {'-'.join(map(str, args.hidden_dims))} (CORL's size)",
    )  # fmt: skip


def model_based_setup(module, batch_size: int) -> Setup:
    """RAVL and MOREC's agent update (SAC-N / SAC on a dataset-and-model batch), with the model buffer
    full of random rows. The dynamics model, the rollouts and the updates of whole runs are timed by
    the runs themselves (their records' `timing`, tabled by `phase_rows`)."""
    args = module.resolve(module.Args(batch_size=batch_size), HOPPER_MEDIUM)
    init, update, *_ = module.make_agent(args, OBS_DIM, ACTION_DIM)
    data = random_transitions(module.Transitions)
    buffer = module.ModelBuffer(data, jnp.int32(0), jnp.int32(ROWS))  # a full buffer
    ratio = args.dataset_ratio if hasattr(args, "dataset_ratio") else args.real_ratio  # RAVL's name, MOREC's
    n_real = int(ratio * batch_size)
    values = {**vars(args), "target_entropy": -float(ACTION_DIM)}
    hp = module.Hyper(*(jnp.float32(values[name]) for name in module.Hyper._fields))

    def make_chunk(n):
        chunk = module.make_train_chunk(update, n_real, batch_size - n_real, n)

        def run(states, keys, data, hp):
            buffers = jax.tree_util.tree_map(lambda x: jnp.broadcast_to(x, (keys.shape[0], *x.shape)), buffer)
            return per_member(lambda s, k, d, h: chunk(s, buffers, k, d, h))(states, keys, data, hp)

        return run

    critics = getattr(args, "num_critics", 2)
    return Setup(
        init, update, data, hp,
        lambda data, key: module.sample_mixed(data, buffer, key, n_real, batch_size - n_real), make_chunk,
        f"actor and {critics} critics {'-'.join(map(str, args.hidden_dims))}, {n_real} of {batch_size} rows real "
        "(hopper preset)",
    )  # fmt: skip


def reinflow_setup(module, batch_size: int) -> Setup:
    """ReinFlow's pre-training (flow matching on action chunks); fine-tuning is environment-bound and
    measured in environment steps/s by its records."""
    args = module.resolve(module.Args(batch_size=batch_size), HOPPER_MEDIUM)
    Ta = args.chunk_len
    num_chunks = ROWS - Ta
    init, update, _, _ = module.make_agent(args, OBS_DIM, ACTION_DIM, num_chunks=num_chunks)
    rng = np.random.default_rng(0)
    data = module.ChunkData(
        jnp.asarray(rng.normal(size=(ROWS, OBS_DIM)), jnp.float32),
        jnp.asarray(rng.uniform(-1, 1, (ROWS, ACTION_DIM)), jnp.float32),
        jnp.arange(num_chunks, dtype=jnp.int32),
    )
    hp = module.Hyper(*(jnp.float32(getattr(args, name)) for name in module.Hyper._fields))

    def sample(data, key):
        i = data.starts[jax.random.randint(key, (batch_size,), 0, num_chunks)]
        return data.observations[i], data.actions[i[:, None] + jnp.arange(Ta)].reshape(batch_size, -1)

    return Setup(
        init, lambda s, b, k, hp: update(s, b[0], b[1], k, hp), data, hp, sample,
        lambda n: per_member(module.make_pretrain_chunk(update, batch_size, Ta, n)),
        f"velocity net {'-'.join(map(str, args.hidden_dims))}, chunks of {Ta} actions (hopper preset)",
    )  # fmt: skip


SETUPS = {
    "iql": iql_setup, "cql": cql_setup, "cal_ql": cql_setup, "dt": dt_setup, "famo2o": famo2o_setup, "bc": bc_setup,
    "ravl": model_based_setup, "morec": model_based_setup, "reinflow": reinflow_setup,
}  # fmt: skip
DEFAULT_BATCH = {"iql": 256, "cql": 256, "cal_ql": 256, "dt": 64, "famo2o": 256, "bc": 256, "ravl": 256, "morec": 256,
                 "reinflow": 128}  # fmt: skip


def init_seeds(init, num_seeds: int):
    """One jitted init per seed, stacked, as the algorithm files do (a jitted vmap of the orthogonal
    initializer hangs XLA on CPU with jax 0.10.2)."""
    init_one = jax.jit(init)
    return jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *[init_one(jax.random.key(s)) for s in range(num_seeds)])


def plain_step(setup: Setup):
    @jax.jit
    def step(state, key):
        key, k_batch, k_update = jax.random.split(key, 3)
        state, metrics = setup.update(state, setup.sample(setup.data, k_batch), k_update, setup.hp)
        return state, key, jax.tree_util.tree_leaves(metrics)[0]

    return step


def flops_per_update(setup: Setup) -> float:
    """XLA's count of floating-point operations of one single-seed update (batch sampling included)."""
    state, key = jax.jit(setup.init)(jax.random.key(0)), jax.random.key(1)
    cost = plain_step(setup).lower(state, key).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, list | tuple) else cost
    return float(cost.get("flops", 0.0))


def matmul_peak(n: int = 2048, reps: int = 20) -> float:
    """Measured float32 FLOP/s of a large square matmul on the default device."""
    return 2 * n**3 / time_matmul((n, n), (n, n), (((1,), (0,)), ((), ())), reps)


DOT = re.compile(
    r"stablehlo\.dot_general [^,]+, [^,]+, (?:batching_dims = \[([\d, ]*)\] x \[([\d, ]*)\], )?"
    r"contracting_dims = \[([\d, ]*)\] x \[([\d, ]*)\][^:]*: \(tensor<([\dx]+)x\w+>, tensor<([\dx]+)x\w+>\)"
)


def parse_matmuls(stablehlo: str) -> Counter:
    """Every matmul (stablehlo.dot_general) of a lowered program: (lhs shape, rhs shape, dimension
    numbers as lax.dot_general takes them) -> how many times it occurs."""
    ints = lambda text: tuple(int(x) for x in (text or "").replace(" ", "").split(",") if x)  # noqa: E731
    shape = lambda text: tuple(int(x) for x in text.rstrip("x").split("x"))  # noqa: E731
    found = Counter()
    for lb, rb, lc, rc, lhs, rhs in DOT.findall(stablehlo):
        found[(shape(lhs + "x"), shape(rhs + "x"), ((ints(lc), ints(rc)), (ints(lb), ints(rb))))] += 1
    return found


def matmul_flops(lhs: tuple, rhs: tuple, dims) -> int:
    """2 x batch x contracted x free(lhs) x free(rhs) multiply-adds of one dot_general."""
    (lc, rc), (lb, rb) = dims
    free_l = math.prod(n for i, n in enumerate(lhs) if i not in lc + lb)
    free_r = math.prod(n for i, n in enumerate(rhs) if i not in rc + rb)
    return 2 * math.prod(lhs[i] for i in lb) * math.prod(lhs[i] for i in lc) * free_l * free_r


def time_matmul(lhs: tuple, rhs: tuple, dims, reps: int = 30) -> float:
    """Seconds of one matmul of these shapes alone: a jitted call of just that dot_general, `reps`
    calls dispatched back to back, best of 3. (Timed inside a lax.scan instead, the same dots ran at
    about half this rate on 2 CPU cores.)"""
    a = jax.random.normal(jax.random.key(0), lhs, jnp.float32)
    b = jax.random.normal(jax.random.key(1), rhs, jnp.float32)
    run = jax.jit(lambda a, b: jax.lax.dot_general(a, b, dims))
    run(a, b).block_until_ready()
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        for _ in range(reps):
            out = run(a, b)
        out.block_until_ready()
        best = min(best, (time.perf_counter() - t0) / reps)
    return best


def cpu_model() -> str:
    """The CPU's model name and widest float vector instructions, from /proc/cpuinfo. The matmul peak
    depends on them: 2 AVX2 cores measured 120-130 GFLOP/s here; files without this field measured
    310-350, more than AVX2 allows at these clocks (AVX-512 machines)."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""
    model = re.search(r"^model name\s*:\s*(.+)$", info, re.M)
    flags = re.search(r"^flags\s*:\s*(.+)$", info, re.M)
    flags = set(flags.group(1).split()) if flags else set()
    vector = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "no AVX2"
    return f"{model.group(1).strip() if model else 'unknown CPU'}, {vector}"


def file_device(result: dict) -> str:
    """The device part of a file's name: the GPU's name, or cpu-avx2 / cpu-avx-512 from the file's
    `cpu` field, since the two kinds of 2-core machine give different numbers and a run on one must
    not overwrite the other's file."""
    name = result["device"].replace(" ", "-").replace("/", "-")
    if result.get("cpu"):
        name += "-" + result["cpu"].rsplit(", ", 1)[-1].lower().replace(" ", "-")
    return name


def where(r: dict) -> str:
    """A file's device column: cpu (2 cores, AMD EPYC, AVX2); files made before the cpu field lack it."""
    return f"{r['device']} ({r['cpu_count']} cores{', ' + r['cpu'] if r.get('cpu') else ''})"


def machine_and_code() -> dict:
    """The machine, the versions, the code and the command of a measurement."""
    return {
        "device": device_name(),
        **({"cpu": cpu_model()} if device_name() == "cpu" else {}),
        "jax_version": jax.__version__,
        "cpu_count": os.cpu_count(),
        "date": time.strftime("%Y-%m-%d"),
        "commit": commit_of_code(),
        "command": ["results/benchmark.py", *sys.argv[1:]],
    }


def measured_on(algo: str, setup: Setup, batch_size: int, peak: float, flops: float) -> dict:
    """What every throughput file starts with: the update measured, the machine and the code."""
    return {
        "algorithm": algo,
        **machine_and_code(),
        "network": setup.network,
        "batch_size": batch_size,
        "matmul_peak_gflops": round(peak / 1e9, 1),
        "gflop_per_update": round(flops / 1e9, 4),
    }


def matmuls(algo: str, batch_size: int, updates: int) -> dict:
    """The update's matmuls at their own shapes: each distinct one timed alone, against the update's
    time measured in the same run. Their summed time bounds how close to the machine's peak the update
    can get without changing what it computes (the 'ceiling')."""
    setup = SETUPS[algo](load_algorithm(algo), batch_size)
    peak, flops = matmul_peak(), flops_per_update(setup)
    state, key = jax.jit(setup.init)(jax.random.key(0)), jax.random.key(1)
    found = parse_matmuls(plain_step(setup).lower(state, key).as_text())
    rows = []
    for (lhs, rhs, dims), count in sorted(found.items(), key=lambda kv: -matmul_flops(*kv[0]) * kv[1]):
        seconds = time_matmul(lhs, rhs, dims)
        gflop = round(count * matmul_flops(lhs, rhs, dims) / 1e9, 4)
        rows.append({"lhs": list(lhs), "rhs": list(rhs), "dims": dims, "count": count, "gflop": gflop,
                     "seconds": count * seconds})  # fmt: skip
    update_s = 1 / time_plain_loop(setup, updates)["updates_per_s"]
    matmul_s = sum(r["seconds"] for r in rows)
    print(f"{sum(found.values())} matmuls ({len(found)} shapes), {sum(r['gflop'] for r in rows):.3f} GFLOP: "
          f"{1e3 * matmul_s:.2f} ms alone; the update {1e3 * update_s:.2f} ms", flush=True)  # fmt: skip
    return {
        **measured_on(algo, setup, batch_size, peak, flops),
        "update_ms": round(1e3 * update_s, 3),
        "matmul_ms": round(1e3 * matmul_s, 3),
        "matmul_gflop": round(sum(r["gflop"] for r in rows), 4),
        "matmuls": [{**r, "seconds": round(r["seconds"], 7)} for r in rows],
    }


def time_plain_loop(setup: Setup, updates: int) -> dict:
    """One jitted call per update (batch sampled inside it), called from a Python loop."""
    step = plain_step(setup)
    state, key = jax.jit(setup.init)(jax.random.key(0)), jax.random.key(1)
    t0 = time.perf_counter()
    state, key, loss = step(state, key)
    loss.block_until_ready()
    compile_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(updates):
        state, key, loss = step(state, key)
    loss.block_until_ready()
    return {"compile_s": round(compile_s, 2), "updates_per_s": round(updates / (time.perf_counter() - t0), 1)}


def time_scan(setup: Setup, num_seeds: int, chunk: int, chunks: int, hp=None, sweep: str = "") -> dict:
    """`num_seeds` members (seeds, or a sweep's points x seeds with `hp` per member)."""
    train_chunk = setup.make_chunk(chunk)
    keys = jnp.stack([jax.random.key(s) for s in range(num_seeds)])
    states = init_seeds(setup.init, num_seeds)
    hp = setup.hp if hp is None else hp
    t0 = time.perf_counter()
    states, keys, metrics = train_chunk(states, keys, setup.data, hp)
    jax.block_until_ready(metrics)
    compile_s = time.perf_counter() - t0  # includes one chunk of updates
    t0 = time.perf_counter()
    for _ in range(chunks):
        states, keys, metrics = train_chunk(states, keys, setup.data, hp)
        jax.device_get(metrics)  # what train() does after every chunk
    per_seed = chunks * chunk / (time.perf_counter() - t0)
    return {
        "num_seeds": num_seeds,
        **({"sweep": sweep} if sweep else {}),
        "first_chunk_s": round(compile_s, 2),
        "updates_per_s_per_seed": round(per_seed, 2),
        "throughput": round(per_seed * num_seeds, 2),
    }


def with_flags(module, changes: dict):
    """The file with its Args built with `changes` on top of what the setup passes (e.g. dropout=0.0)."""
    if changes:
        make_args = module.Args
        module.Args = lambda **given: make_args(**{**given, **changes})
    return module


def benchmark(algo: str, seeds: list[int], updates: int, chunk: int, batch_size: int, sweep_seeds: int,
              changes: dict | None = None) -> dict:  # fmt: skip
    module = with_flags(load_algorithm(algo), changes or {})
    setup = SETUPS[algo](module, batch_size)
    if changes:
        setup = setup._replace(network=f"{setup.network}, with {changed(changes)}")
    peak = matmul_peak()
    flops = flops_per_update(setup)
    print(f"float32 matmul peak {peak / 1e9:.1f} GFLOP/s; one update {flops / 1e9:.3f} GFLOP", flush=True)
    plain = time_plain_loop(setup, updates)
    plain["fraction_of_peak"] = round(plain["updates_per_s"] * flops / peak, 3)
    print(f"plain jitted single-seed loop: {plain}", flush=True)
    scans = []
    runs = [(n, None, "") for n in seeds]
    if sweep_seeds and hasattr(module, "SWEEPABLE"):
        hp, name = sweep_hyper(setup.hp, module.SWEEPABLE, sweep_seeds)
        runs.append((9 * sweep_seeds, hp, name))
    for n, hp, name in runs:
        res = time_scan(setup, n, chunk, max(1, updates // chunk), hp, name)
        res["fraction_of_peak"] = round(res["throughput"] * flops / peak, 3)
        print(f"lax.scan x vmap, {n} members{' (sweep ' + name + ')' if name else ''}: {res}", flush=True)
        scans.append(res)
    return {
        **measured_on(algo, setup, batch_size, peak, flops),
        "plain_loop": plain,
        "scan_vmap": scans,
    }


def table() -> str:
    rows = [
        "# Update throughput",
        "",
        "Generated by `python results/benchmark.py --table` from the JSON files here; each file comes from "
        "`python results/benchmark.py --algo ALGO`. Throughput = seeds x updates/s per seed; the plain loop is "
        "one jitted call per update from Python, measured in the same run.",
        "",
        "On 2 CPU cores one full-size update already keeps both cores busy, so 4 or 16 vmapped seeds give about "
        "the throughput of one seed or less (0.8-1.1x on the AVX-512 files; IQL on AVX2 0.89x for 4 and 0.68x "
        "for 16): on a CPU, seeds cost wall time linearly. The seed axis is there "
        "for accelerators. On an NVIDIA H200 (4 December, code a052acb, JAX 0.11.2; the rows naming it) IQL's "
        "update runs 8284 updates/s for one seed and 51518 member-updates/s for 16 (3220 each), CQL's 2244 and "
        "5711 (357 each): members cost far less than on a CPU, but not nothing; 27 members (a 3 x 3 sweep x 3 "
        "seeds) take 3.5x one seed's time per update for IQL and 9.6x for CQL. That machine's matmul peak is "
        "float32 at JAX's default precision (TF32 on the tensor cores), and these updates reach 2-37% of it: "
        "one seed's update is bound by its many small kernels, not by arithmetic. Each added member is not: "
        "from these rows (1 / updates/s per member, less one seed's, over the added members), a member "
        "added to 16 or 27 costs IQL's update 12.7 and 11.6 us (120.7 us for one seed), its 0.57 GFLOP at "
        "45-49 TFLOP/s, and CQL's 157 and 147 us (445.6 for one), its 13.5 GFLOP at 86-92 TFLOP/s: "
        "batched matmuls of 256-wide layers at 17-40% of the peak, so the member axis is bound by "
        "arithmetic at that efficiency. DT's benchmark "
        "there was stopped by the call's limit (no file). The whole-run checks are in their own section "
        "below. One member runs unbatched "
        "(`common.members.vmap_members`): "
        "batched kernels with a batch of 1 cost IQL's update ~10%.",
        "",
        "The matmul peak is one 2048 x 2048 float32 matmul; the networks' matmuls are 256 wide (DT's 128), and "
        "their elementwise work (activations, Adam, random bits) is not in the FLOP count, so no update reaches "
        "the peak. Two kinds of 2-core machine made these files; compare rows of one kind only. Files that "
        "name an AVX2 CPU (cpu (2 cores, AMD EPYC, AVX2), 4 December 2026 "
        "on) come from AVX2 machines whose peak measured 120-180 GFLOP/s (124-133 for DT on 3-4 December, 170-180 "
        "for IQL and CQL on 4 December); the others measured 264-350 GFLOP/s (310-350 on 2-3 December, 264-281 "
        "on the Intel Xeon machine of 4 December), more than AVX2 allows at these clocks (AVX-512 machines). "
        "File names carry the kind (ALGO__cpu-avx2.json, "
        "ALGO__cpu-avx-512.json), so a run on one kind keeps the other's file; files made before the cpu field "
        "were named for the kind their peak shows (4 December). The same matmuls reach different shares of the "
        "two peaks (DT's, timed alone: 62% of the AVX-512 peak on 3 December, in that file's git history, "
        "72% of the AVX2 one), so a % of peak from one kind says little about the other.",
        "",
        "IQL and CQL on an AVX2 machine (4 December, code c905724): IQL's one seed 72% of peak (228.9 updates/s), "
        "4 seeds 64%; CQL's one seed 62% (7.77 updates/s), 4 seeds 68%. On the same machine JAX-CORL's IQL ran "
        "184-192 updates/s against this file's scan at 189-212 (0.99-1.14x per round; 1.21-1.30x on an AVX-512 "
        "machine on 2 December): short of the 1.15x aim here. On an AVX-512 machine (Intel Xeon, 4 December, "
        "code 4e54a98) JAX-CORL's ran 240.0-249.8 updates/s against 303.5-308.3 (1.23-1.28x). In the table below, the "
        "row without a CPU name is the AVX2 run (made before peer_benchmark.py recorded the CPU; its file name "
        "says AVX2).",
        "",
        "IQL, CQL and DT on that AVX-512 machine (Intel Xeon, 4 December, code 965e26e; the files named "
        "cpu-avx-512 whose device column names the CPU), alone on it: IQL's one seed 57% of peak (280.3 "
        "updates/s; 58% for 4 seeds), CQL's 71% (14.68 updates/s; 66% for 4), DT's 48% (8.75 updates/s; 47% "
        "for 4). The 60% aim holds for all three on the AVX2 machine and for CQL alone on this one. (IQL's "
        "first run here was timed while a table was regenerated; it was discarded and run again alone.)",
        "",
        "DT: one seed reaches 60% of the AVX2 machine's peak (4.89 updates/s; 57% for 4 seeds), since its "
        "dropout masks come from a hash of each element's index and its LayerNorm is written out (71e8aa5): "
        "without dropout (`--set dropout=0.0`, the row marked so) one seed runs 5.47 updates/s, so dropout is "
        "now 11% of the update where threefry bits for every element made it 15% (8.7 against 10.2 updates/s "
        "on an AVX-512 machine, 3 December, where the code before this change reached 39% of that peak; "
        "git history of dt__cpu.json, dt__cpu-avx2.json since). Its matmuls alone take 153 of its 227 ms (the "
        "matmuls section), a "
        "ceiling of 75% of peak. Earlier rewrites that change nothing computed raised DT's update from 6.7 to "
        "8.7 updates/s (AVX-512, files of 2 and 3 December) and CQL's and Cal-QL's from 13.4 and 13.9 to "
        "18.7: their dense layers see 2-D matrices (XLA's CPU weight gradient of a 3-D dot contracting two "
        "axes ran 2-3.5x slower than the same 2-D matmul). Slow updates were timed over 100-200 updates (the "
        "`command` in each JSON file), so their rows are noisier.",
        "",
        "Members: seeds, or a --sweep's grid points x seeds (the sweep column names the grid). GFLOP/update: "
        "XLA's cost analysis of one single-seed update; % of peak: throughput x GFLOP/update over the measured "
        "float32 matmul peak of the same run (files made before these columns leave them empty).",
        "",
        "| algorithm | network | batch | device | plain loop (updates/s) | members | sweep | updates/s per member "
        "| throughput | first chunk (s) | GFLOP/update | matmul peak (GFLOP/s) | % of peak |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for path in sorted(OUT.glob("*.json")):
        if path.name.startswith(("peer_", "matmuls__", "gpu_", "eval__")):
            continue
        r = json.loads(path.read_text())
        for s in r["scan_vmap"]:
            share = f"{100 * s['fraction_of_peak']:.0f}" if "fraction_of_peak" in s else ""
            rows.append(
                f"| {r['algorithm']} | {r['network']} | {r['batch_size']} | {where(r)} | "
                f"{r['plain_loop']['updates_per_s']} | {s['num_seeds']} | {s.get('sweep', '')} | "
                f"{s['updates_per_s_per_seed']} | {s['throughput']} | {s['first_chunk_s']} | "
                f"{r.get('gflop_per_update', '')} | {r.get('matmul_peak_gflops', '')} | {share} |"
            )
    return "\n".join(rows + matmul_rows() + peer_rows() + gpu_rows() + evaluation_rows() + phase_rows()) + "\n"


def matmul_rows() -> list[str]:
    """The updates' matmuls at their own shapes (the files of `--matmuls`)."""
    paths = sorted(OUT.glob("matmuls__*.json"))
    if not paths:
        return []
    rows = [
        "",
        "## The updates' matmuls at their own shapes",
        "",
        "Generated from the files of `python results/benchmark.py --algo ALGO --matmuls`: every matmul "
        "(dot_general) of one single-seed update as XLA receives it, each distinct shape timed alone (30 "
        "jitted calls of just that matmul, best of 3) times its count, against the update's own time in the "
        "same run (a plain jitted loop). Ceiling: the update's GFLOP over its matmuls' time alone, as a % of "
        "the same run's matmul peak: what the update would reach if everything but its matmuls took no time. "
        "Independent matmuls can overlap inside an update (two critics on two cores), so a share can exceed "
        "100%.",
        "",
        "| algorithm | network | device | commit | matmuls (shapes) | their GFLOP | alone (ms) | their GFLOP/s "
        "| update (ms) | matmuls' share of the update | matmul peak (GFLOP/s) | ceiling (% of peak) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for path in paths:
        r = json.loads(path.read_text())
        count = sum(m["count"] for m in r["matmuls"])
        ceiling = r["gflop_per_update"] / (r["matmul_ms"] / 1e3) / r["matmul_peak_gflops"]
        rows.append(
            f"| {r['algorithm']} | {r['network']} | {where(r)} | {r['commit']} | "
            f"{count} ({len(r['matmuls'])}) | {r['matmul_gflop']} | {r['matmul_ms']} | "
            f"{r['matmul_gflop'] / (r['matmul_ms'] / 1e3):.1f} | {r['update_ms']} | "
            f"{100 * r['matmul_ms'] / r['update_ms']:.0f}% | {r['matmul_peak_gflops']} | {100 * ceiling:.0f} |"
        )
    return rows


def peer_rows() -> list[str]:
    """The side-by-side runs of results/peer_benchmark.py (IQL against JAX-CORL's)."""
    paths = sorted(OUT.glob("peer_*.json"))
    if not paths:
        return []
    rows = [
        "",
        "## IQL against JAX-CORL's, side by side",
        "",
        "Generated from the files of `python results/peer_benchmark.py --jax-corl PATH` (its docstring says "
        "how): one process, the same random HalfCheetah-shaped data, rounds alternating between the runners; "
        "updates/s per round. Nothing of JAX-CORL is in this repository.",
        "",
        "| device | date | JAX-CORL commit | JAX-CORL (updates/s) | iql.py, lax.scan | iql.py, jitted call per update "
        "| scan / JAX-CORL |",
        "|---|---|---|---|---|---|---|",
    ]
    for path in paths:
        r = json.loads(path.read_text())
        rate = lambda name, r=r: ", ".join(map(str, r["updates_per_s"][name]))  # noqa: E731
        rows.append(
            f"| {where(r)} | {r['date']} | {r['peer']['commit'][:7]} | {rate('jax_corl')} "
            f"| {rate('jaxorl_scan')} | {rate('jaxorl_plain')} | "
            f"{', '.join(f'{x:.2f}x' for x in r['ratio_scan_over_jax_corl'])} |"
        )
    return rows


def gpu_rows() -> list[str]:
    """The whole-run checks of results/gpu_checks.sh: its gpu_checks__DEVICE.json and the records of its
    runs beside it (gpu_iql_1M_x5__DEVICE.json, gpu_iql_one_seed__DEVICE.json, gpu_iql_sweep_x5__DEVICE.json)."""
    paths = sorted(OUT.glob("gpu_checks__*.json"))
    if not paths:
        return []
    rows = [
        "",
        "## Whole IQL runs on a GPU",
        "",
        "Generated from the files of `bash results/gpu_checks.sh OUT` (its header says how; one call on a lent "
        "machine), copied here as gpu_checks__DEVICE.json and, for each run that finished, its record as "
        "gpu_iql_RUN__DEVICE.json. Wall: the script's, from starting the process to its end; the run's own: "
        "its record's wall time (first compile included), of which evaluation: the sum of its evaluations' "
        "seconds. The dataset is a 200k-transition build of local/hopper/medium-v0, not the grid's: the "
        "scores are no benchmark result. A blank wall time: the run did not finish within the call.",
        "",
        "On the H200 (4 December, code a052acb) 1M updates x 5 seeds took 331.9 s, 32 s over the target: "
        "114.6 s of the run's 321.6 s went to its 10 evaluations of 50 hopper episodes, stepped on one host "
        "core at 3.3k-6.0k env steps/s, counting the steps of envs whose episode had already ended (34-66% "
        "of the steps in the first four evaluations). The one-seed run finished in 30.0 s "
        "(gpu_checks__NVIDIA-H200.log); the sweep was stopped by the call's limit during its last evaluation "
        "(450 episodes; its first took about 90 s by the log's progress bar), so neither has a record or a "
        "wall time in the JSON file, "
        "which the script then wrote only after the sweep (it now keeps each run's record as it ends). "
        "Since then evaluation steps only running episodes and, on machines of more than 2 cores, spreads "
        "the envs over worker processes (`JAXORL_EVAL_WORKERS`, common/evaluation.py): not yet measured on "
        "a GPU. The update alone: 27 members cost IQL's update 3.5x one seed's time on this GPU (the table "
        "above), so the sweep's target is out of reach for the update alone until that scaling improves.",
        "",
        "| check | device | date | commit | updates | members | wall (s) | the run's own (s) | of which evaluation (s) "
        "| final normalized score | target | met |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for path in paths:
        g = json.loads(path.read_text())
        device = path.name.removeprefix("gpu_checks__")

        def run_cells(name: str, device: str = device) -> tuple[str, str, str]:
            record = OUT / f"gpu_iql_{name}__{device}"
            if not record.exists():
                return "", "", ""
            r = json.loads(record.read_text())
            evals = round(sum(e.get("eval_seconds", 0.0) for e in r["evaluations"]), 1)
            return (
                str(r["wall_time_s"]),
                str(evals),
                f"{r['final']['normalized_mean']:.1f} ± {r['final']['normalized_std']:.1f}",
            )

        one_m, sweep = g["iql_1M_x5"], g["iql_sweep"]
        met = lambda ok: "" if ok is None else ("yes" if ok else "no")  # noqa: E731
        rows.append(
            f"| 1M updates x 5 seeds, 10 evaluations | {g['device']} | {g['date']} | {g['commit']} | "
            f"{one_m['updates']} | {one_m['seeds']} | {one_m['wall_s'] or ''} | {' | '.join(run_cells('1M_x5'))} | "
            f"under 300 s | {met(None if one_m['wall_s'] is None else one_m['wall_s'] < 300)} |"
        )
        rows.append(
            f"| one seed (against the sweep) | {g['device']} | {g['date']} | {g['commit']} | {sweep['updates']} | 1 | "
            f"{sweep['one_seed_wall_s'] or ''} | {' | '.join(run_cells('one_seed'))} |  |  |"
        )
        ratio = sweep.get("ratio")
        rows.append(
            f"| 3 x 3 sweep x 5 seeds | {g['device']} | {g['date']} | {g['commit']} | {sweep['updates']} | "
            f"{sweep['members']} | {sweep['wall_s'] or ''} | {' | '.join(run_cells('sweep_x5'))} | "
            f"under 3x one seed's wall{f' ({ratio}x)' if ratio else ''} | {met(None if ratio is None else ratio < 3)} |"
        )
    return rows


PHASE_FILES = ("ravl", "morec", "reinflow")


def phase_costs(record: dict) -> dict:
    """What one run spent where, from its record: the dynamics model's and the dynamics reward's training
    (seconds), and over all its evaluations' `timing` (RAVL, MOREC): seconds per rollout round, model
    steps/s (every step computed, masked ones included), transitions kept/s, agent updates/s; and
    ReinFlow's environment steps/s while fine-tuning."""
    dynamics = record.get("dynamics", {})
    timing = [e["timing"] for e in record["evaluations"] if e.get("timing")]
    rounds = sum(t["rollout_rounds"] for t in timing)
    rolled = [(t["rollout_rounds"] * t["rollout_round_s"], t) for t in timing if t["rollout_rounds"]]  # (seconds, t)
    rollout_s = sum(seconds for seconds, _ in rolled)
    steps = sum(seconds * t["model_steps_per_s"] for seconds, t in rolled)
    kept = sum(seconds * t["kept_transitions_per_s"] for seconds, t in rolled)
    updates = sum(t["updates"] for t in timing)
    update_s = sum(t["updates"] / t["updates_per_s"] for t in timing if t["updates"])
    env = [e["train_env_steps_per_s"] for e in record["evaluations"] if "train_env_steps_per_s" in e]
    per_s = lambda n, s: round(n / s, 1) if s > 0 else None  # noqa: E731
    loaded = dynamics.get("source") not in (None, "trained", "simulator")  # --dynamics-path: another run's
    return {
        "model_training_s": "loaded" if loaded else dynamics.get("train_seconds"),
        "reward_training_s": "loaded" if loaded else dynamics.get("reward", {}).get("train_seconds"),
        "rollout_round_s": round(rollout_s / rounds, 2) if rounds else None,
        "model_steps_per_s": per_s(steps, rollout_s),
        "kept_transitions_per_s": per_s(kept, rollout_s),
        "updates_per_s": per_s(updates, update_s),
        "env_steps_per_s": round(float(np.mean(env)), 1) if env else None,
    }


def phase_rows(records: Path | None = None) -> list[str]:
    """A table of what whole runs of RAVL, MOREC and ReinFlow spent where, from their records."""
    import tables  # results/tables.py: the records' labels and variants

    records = records or REPO / "results" / "records"
    rows = [
        "",
        "## Whole runs: model training, rollouts, updates and environment steps",
        "",
        "Read from the records in results/records/ (real runs of the committed code, the command and budget "
        "in results/README.md), not from random data: seconds to train the dynamics model (RAVL, MOREC) and "
        "MOREC's dynamics reward; per rollout round of the current policy in the model (or, `true`, the "
        "simulator on the host), its seconds, model steps/s (every step of every rollout and member "
        "computed, including those masked after a termination) and transitions kept/s; the agent's "
        "updates/s between rounds, all members together; ReinFlow's environment steps/s while fine-tuning "
        "(all members' environments, updates included). Each phase is timed from an idle device to its "
        "results, its first (compiling) call left out.",
        "",
        "| algorithm | dataset | members | device | commit | model training (s) | dynamics reward (s) "
        "| rollout round (s) | model steps/s | kept transitions/s | agent updates/s | fine-tuning env steps/s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    found = [
        r
        for path in sorted(records.rglob("*.json"))
        for r in [tables.load(path)]
        if r["algorithm"] in PHASE_FILES
        and (any("timing" in e for e in r["evaluations"]) or r["algorithm"] == "reinflow")
    ]
    if not found:
        return rows[:-3] + ["No record of these files carries its phases' timings yet."]
    blank = lambda x: "" if x is None else x  # noqa: E731
    for r in found:
        c = phase_costs(r)
        rows.append(
            f"| {tables.label(r)} | {r['dataset']} | {len(r['seeds']) * len(r.get('sweep', {}).get('points', [0]))} "
            f"| {r['device']} | {r['commit']}{' (dirty)' if r.get('dirty') else ''} | "
            + " | ".join(
                str(blank(c[k]))
                for k in (
                    "model_training_s",
                    "reward_training_s",
                    "rollout_round_s",
                    "model_steps_per_s",
                    "kept_transitions_per_s",
                    "updates_per_s",
                    "env_steps_per_s",
                )
            )  # fmt: skip
            + " |"
        )
    return rows


def evaluation_speed(dataset_id: str, members: list[int], episodes: int) -> dict:
    """Episodes and env steps per second of common.evaluation.evaluate: `episodes` episodes for each
    member, one batched call of a 256-256 policy (random weights, actions scaled to 0.1) per step,
    episodes to the time limit (the robots' termination turned off, as a good policy rarely falls),
    in this process (JAXORL_EVAL_WORKERS=0) and, on machines of more than 2 cores, in the default
    worker processes. The policy is compiled and the workers started before each timing."""
    from common import evaluation
    from common.data import load_dataset

    _, meta = load_dataset(dataset_id, to_device=False)
    if meta.robot in ("hopper", "walker2d", "ant"):  # every episode runs to the time limit, as a good policy's
        kwargs = {**meta.env_spec.kwargs, "terminate_when_unhealthy": False}
        meta = dataclasses.replace(meta, env_spec=dataclasses.replace(meta.env_spec, kwargs=kwargs))

    def init(key, m):
        sizes = [meta.obs_dim, 256, 256, meta.action_dim]
        keys = jax.random.split(key, len(sizes) - 1)
        return [jax.random.normal(k, (m, a, b)) / np.sqrt(a) for k, a, b in zip(keys, sizes[:-1], sizes[1:])]

    @jax.jit
    def policy(params, carry, obs, prev_reward, rng):
        h = obs
        for w in params[:-1]:
            h = jax.nn.relu(jnp.einsum("sni,sio->sno", h, w))
        return 0.1 * jnp.tanh(jnp.einsum("sni,sio->sno", h, params[-1])), carry

    before = os.environ.get("JAXORL_EVAL_WORKERS")
    runs = []
    try:
        for m in members:
            n = m * episodes
            params = init(jax.random.key(m), m)
            policy(params, None, jnp.zeros((m, episodes, meta.obs_dim)), jnp.zeros((m, episodes)), jax.random.key(0))
            os.environ.pop("JAXORL_EVAL_WORKERS", None)
            modes = ["0"] + ([None] if evaluation.eval_workers(n) else [])
            for mode in modes:
                if mode is None:
                    os.environ.pop("JAXORL_EVAL_WORKERS", None)
                else:
                    os.environ["JAXORL_EVAL_WORKERS"] = mode
                workers = evaluation.eval_workers(n)
                if workers:
                    evaluation.pooled_envs(meta, n, workers)
                r = evaluation.evaluate(meta, policy, params, num_episodes=episodes, seed=0)
                steps = int(r.lengths.sum())
                run = {"members": m, "episodes": episodes, "workers": workers, "seconds": round(r.seconds, 2),
                       "episodes_per_s": round(n / r.seconds, 1), "env_steps_per_s": round(steps / r.seconds),
                       "mean_length": round(steps / n, 1)}  # fmt: skip
                print(run, flush=True)
                runs.append(run)
            evaluation.drop_pool()
    finally:
        evaluation.drop_pool()
        if before is None:
            os.environ.pop("JAXORL_EVAL_WORKERS", None)
        else:
            os.environ["JAXORL_EVAL_WORKERS"] = before
    return {
        **machine_and_code(),
        "dataset": dataset_id,
        "env": meta.env_spec.id,
        "policy": "256-256 MLP, random weights, actions x 0.1; termination off",
        "runs": runs,
    }


def evaluation_rows() -> list[str]:
    """The files of `--eval`."""
    paths = sorted(OUT.glob("eval__*.json"))
    if not paths:
        return []
    rows = [
        "",
        "## Evaluation",
        "",
        "Generated from the files of `python results/benchmark.py --eval`: `common.evaluation.evaluate` on a "
        "dataset's environment, every episode of every member side by side, one batched call of a 256-256 "
        "policy (random weights, small actions) per step, the robots' termination turned off so that every "
        "episode runs to the time limit as a good policy's would. Seconds include making the envs. Workers 0: the "
        "envs step in the calling process; otherwise in that many worker processes (the default on machines "
        "of more than 2 cores; `JAXORL_EVAL_WORKERS`). Env steps/s counts the steps of all envs together.",
        "",
        "| device | date | commit | env | members x episodes | workers | seconds | episodes/s | env steps/s "
        "| mean episode length |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for path in paths:
        r = json.loads(path.read_text())
        for run in r["runs"]:
            rows.append(
                f"| {where(r)} | {r['date']} | {r['commit']} | {r['env']} | {run['members']} x {run['episodes']} | "
                f"{run['workers']} | {run['seconds']} | {run['episodes_per_s']} | {run['env_steps_per_s']} | "
                f"{run['mean_length']} |"
            )
    return rows


def commit_of_code() -> str:
    """The commit the measured code is at, with " (dirty)" if algorithms/ or common/ had uncommitted changes."""
    commit, _ = git_state()
    try:
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "algorithms", "common"], cwd=REPO,
                               capture_output=True, text=True, timeout=5).stdout.strip()  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        dirty = "unknown"
    return commit + (" (dirty)" if dirty else "")


def changed(changes: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in changes.items())


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--algo", default="iql", choices=sorted(SETUPS))
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--sweep-seeds", type=int, default=3, help="seeds of the 3 x 3 sweep (0: no sweep)")
    p.add_argument("--updates", type=int, default=2000, help="timed updates per configuration")
    p.add_argument("--chunk", type=int, default=500, help="updates per lax.scan call")
    p.add_argument("--batch-size", type=int, default=None, help="default: the file's (256; DT 64)")
    p.add_argument("--set", nargs="+", default=[], metavar="NAME=VALUE",
                   help="Args fields changed for this timing (e.g. dropout=0.0); its own file")  # fmt: skip
    p.add_argument("--matmuls", action="store_true",
                   help="time the update's matmuls at their own shapes instead (matmuls__ALGO__DEV.json)")  # fmt: skip
    p.add_argument("--eval", action="store_true",
                   help="time evaluation instead: episodes and env steps/s (eval__DEV.json)")  # fmt: skip
    p.add_argument("--eval-dataset", default="local/hopper/medium-v0", help="--eval: whose environment")
    p.add_argument("--eval-members", type=int, nargs="+", default=[1, 5, 45], help="--eval: members (seeds)")
    p.add_argument("--eval-episodes", type=int, default=10, help="--eval: episodes per member")
    p.add_argument("--table", action="store_true", help="only regenerate results/throughput/README.md")
    a = p.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    if a.eval and not a.table:
        result = evaluation_speed(a.eval_dataset, a.eval_members, a.eval_episodes)
        atomic_write(OUT / f"eval__{file_device(result)}.json", json.dumps(result, indent=1) + "\n")
    elif a.matmuls and not a.table:
        result = matmuls(a.algo, a.batch_size or DEFAULT_BATCH[a.algo], a.updates)
        atomic_write(OUT / f"matmuls__{a.algo}__{file_device(result)}.json", json.dumps(result, indent=1) + "\n")
    elif not a.table:
        changes = {}
        for item in a.set:
            field, eq, value = item.partition("=")
            if not eq:
                p.error(f"--set {item!r}: write NAME=VALUE")
            changes[field.replace("-", "_")] = ast.literal_eval(value)
        batch_size = a.batch_size or DEFAULT_BATCH[a.algo]
        result = benchmark(a.algo, a.seeds, a.updates, a.chunk, batch_size, a.sweep_seeds, changes)
        name = file_device(result)
        suffix = f"__{changed(changes).replace(', ', '__')}" if changes else ""
        atomic_write(OUT / f"{a.algo}__{name}{suffix}.json", json.dumps(result, indent=1) + "\n")
    atomic_write(OUT / "README.md", table())
    print(table())


if __name__ == "__main__":
    main()
