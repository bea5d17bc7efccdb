"""Behaviour policies of the local locomotion datasets: the robots, their reference returns, and a
numpy forward pass of the SAC actor that `sac.py` trains and `make.py` collects with.

Inference runs in numpy on the CPU so that a rebuild of a dataset does not depend on the JAX
backend; the actor is small (two hidden layers), so batching over a few environments is enough.

Why the forward pass is written out by hand: a dataset id must build to the same bytes on every
machine, and a hopper or walker is chaotic, so one action that differs in its last bit sends an
episode down another trajectory (and changes how many episodes fit the requested size). The plain
`obs @ kernel` goes to OpenBLAS, which picks a different kernel per CPU (SkylakeX, Haswell,
Prescott, ...) with a different summation order and FMA use; numpy's `np.tanh`/`np.exp` pick a
different SIMD implementation per CPU (AVX512, AVX2, baseline) with different roundings. Measured
on one machine by forcing those choices (`OPENBLAS_CORETYPE`, `NPY_DISABLE_CPU_FEATURES`), the old
float32 `@`/`np.tanh`/`np.exp` pass gave four different fingerprints for one 3,000-step build under
six settings (datasets/README.md); this one gives the same under all six.

So `actor_forward` and `act` use only operations whose result IEEE-754 defines exactly, element by
element: float64 `+ - * /`, `np.round` (to nearest, ties to even), `np.ldexp`, and exact selections
(`np.maximum`, `np.minimum`, `np.clip`, `np.abs`, `np.where`).
- Matrix products (`fixed_matmul`): every product x[b, k] * W[k, o] is formed by one elementwise
  multiply, then the products are summed over k by a fixed pairwise tree of elementwise adds
  (halves added to halves, an odd last row folded into the first). No BLAS and no numpy reduction,
  whose order could depend on the SIMD width.
- `fixed_exp`, `fixed_expm1` and `fixed_tanh`: range reduction x = n ln2 + r (ln2 split in two so
  n ln2 is exact), a degree-13 Taylor polynomial of expm1(r) by Horner's rule for |r| <= ln2/2
  (truncation error below 1e-17), and a scaling by 2**n with `np.ldexp`; tanh(x) =
  -expm1(-2|x|) / (2 + expm1(-2|x|)) with the sign of x, exactly +-1 beyond |x| = 20.
These agree with numpy's own functions to within a few ulp, and they are the same bits on any
IEEE-754 machine. The action is cast to float32 at the end, as before. Speed: a hopper chunk of 16
episodes costs about the same CPU time as with the BLAS pass (the env dominates; see README).

What machine dependence remains: MuJoCo itself. Its compiled code is the same on every x86-64
machine that runs the wheel, but it calls the C math library (sin and cos for hinge joints, pow
for contact impedance, ...), and glibc picks FMA or non-FMA variants of those by CPU (and changes
them between glibc versions). Forcing glibc's non-FMA variants (`GLIBC_TUNABLES=
glibc.cpu.hwcaps=-AVX2,-FMA`) changes the same small build's fingerprint with this code too: the
first difference is an observation MuJoCo returns after identical actions. Every
x86-64 CPU since about 2013-2015 has FMA, so builds agree across current machines with the same
glibc, MuJoCo, Gymnasium and numpy; other combinations are not promised. The noise comes from
numpy's PCG64 `standard_normal`, whose ziggurat only calls the C library's exp/log1p in its rare
wedge and tail cases (20M draws measured identical with and without glibc's FMA variants).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
POLICY_DIR = HERE / "policies"
MANIFEST = POLICY_DIR / "manifest.json"

# robot -> Gymnasium env id (MuJoCo v5 robots, as Minari's mujoco/* datasets use).
ROBOTS = {"halfcheetah": "HalfCheetah-v5", "hopper": "Hopper-v5", "walker2d": "Walker2d-v5"}
# D4RL's reference returns (d4rl/infos.py), used for every locomotion score in this repo.
REF_SCORES = {
    "halfcheetah": (-280.178953, 12135.0),
    "hopper": (-20.272305, 3234.3),
    "walker2d": (1.629008, 4592.3),
}
# The actor squashes its log-std into this range (as CleanRL's SAC does).
LOG_STD_MIN, LOG_STD_MAX = -5.0, 2.0


def normalized_score(robot: str, ret: float) -> float:
    lo, hi = REF_SCORES[robot]
    return 100.0 * (ret - lo) / (hi - lo)


def load_params(path: str | Path) -> dict:
    """Actor parameters from a flax msgpack file, as nested dicts of float32 numpy arrays."""
    from flax import serialization  # imported here: collection workers need only numpy

    raw = serialization.msgpack_restore(Path(path).read_bytes())
    return {k: {n: np.asarray(v, np.float32) for n, v in layer.items()} for k, layer in raw.items()}


# --- fixed-order arithmetic: the same bits on every IEEE-754 machine --------------------------

# ln2 split so that n * LN2_HI is exact for |n| < 2**21 (LN2_HI has 32 significant bits).
LN2_HI = 6.93147180369123816490e-01
LN2_LO = 1.90821492927058770002e-10
INV_LN2 = 1.44269504088896338700e00
# 1 / k! for k = 13 .. 2, as float64 literals (the same constants everywhere; no libm involved).
_INV_FACT = tuple(1.0 / math.factorial(k) for k in range(13, 1, -1))
EXP_MAX = 700.0  # |x| beyond this is clamped: exp(700) ~ 1e304 is still finite
TANH_SATURATION = 20.0  # tanh(20) rounds to exactly 1.0 in float64


def fixed_matmul(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """x [B, K] @ w [K, N] in float64 in a fixed order: all products by one elementwise multiply,
    then summed over K by a fixed pairwise tree of elementwise adds (no BLAS, no numpy reduction)."""
    x = np.asarray(x, np.float64)
    k = w.shape[0]
    p = np.multiply(x.T[:, :, None], w[:, None, :])  # [K, B, N]; p[k] = x[:, k, None] * w[k]
    while k > 1:
        if k % 2:  # fold the odd last row into the first
            np.add(p[0], p[k - 1], out=p[0])
            k -= 1
        h = k // 2
        np.add(p[:h], p[h:k], out=p[:h])
        k = h
    return p[0]


def fixed_expm1(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(exp(x), expm1(x)) by range reduction x = n ln2 + r and a degree-13 Taylor polynomial."""
    x = np.clip(np.asarray(x, np.float64), -EXP_MAX, EXP_MAX)
    n = np.round(x * INV_LN2)  # round half to even: exact
    r = (x - n * LN2_HI) - n * LN2_LO  # |r| <= ln2 / 2 (plus a few ulp)
    p = np.full_like(r, _INV_FACT[0])
    for c in _INV_FACT[1:]:
        p = p * r + c
    q = (p * r + 1.0) * r  # expm1(r) = r + r^2/2! + ... + r^13/13!
    ni = n.astype(np.int64)
    e = np.ldexp(1.0 + q, ni)  # exact scaling by 2**n
    return e, np.where(ni == 0, q, e - 1.0)


def fixed_exp(x: np.ndarray) -> np.ndarray:
    return fixed_expm1(x)[0]


def fixed_tanh(x: np.ndarray) -> np.ndarray:
    """tanh(x) = sign(x) * -expm1(-2|x|) / (2 + expm1(-2|x|)); exactly +-1 for |x| >= 20."""
    x = np.asarray(x, np.float64)
    a = np.minimum(np.abs(x), TANH_SATURATION)
    em = fixed_expm1(-2.0 * a)[1]
    t = -em / (2.0 + em)
    return np.where(x < 0, -t, t) + 0.0  # + 0.0 turns tanh(0) = -0.0 into +0.0


def prepare(params: dict) -> dict:
    """The actor's layers as float64 arrays, the mean and log-std heads side by side in one
    kernel (computed in one product; each column's sum does not depend on the others)."""
    if params.get("prepared"):
        return params
    hidden = sorted((k for k in params if k.startswith("Dense_")), key=lambda k: int(k[6:]))
    f64 = lambda a: np.asarray(a, np.float64)  # noqa: E731 (float32 -> float64 is exact)
    return {
        "prepared": True,
        "hidden": [(f64(params[n]["kernel"]), f64(params[n]["bias"])) for n in hidden],
        "head_kernel": np.concatenate([f64(params["mean"]["kernel"]), f64(params["log_std"]["kernel"])], 1),
        "head_bias": np.concatenate([f64(params["mean"]["bias"]), f64(params["log_std"]["bias"])]),
    }


def actor_forward(params: dict, obs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(mean, log_std) of the pre-tanh Gaussian for a batch of observations [B, obs_dim], float64.
    `params` as `load_params` returns them or as `prepare` makes them (faster when reused)."""
    p = prepare(params)
    h = np.asarray(obs, np.float32).astype(np.float64)  # the actor was trained on float32 inputs
    for kernel, bias in p["hidden"]:
        h = np.maximum(fixed_matmul(h, kernel) + bias, 0.0)
    out = fixed_matmul(h, p["head_kernel"]) + p["head_bias"]
    d = out.shape[1] // 2
    mean, raw = out[:, :d], out[:, d:]
    log_std = LOG_STD_MIN + 0.5 * (LOG_STD_MAX - LOG_STD_MIN) * (fixed_tanh(raw) + 1.0)
    return mean, log_std


def act(params: dict, obs: np.ndarray, noise: np.ndarray | None) -> np.ndarray:
    """tanh(mean + std * noise) as float32; `noise=None` gives the deterministic action tanh(mean)."""
    mean, log_std = actor_forward(params, obs)
    if noise is not None:
        mean = mean + fixed_exp(log_std) * np.asarray(noise, np.float64)
    return fixed_tanh(mean).astype(np.float32)


def read_manifest() -> dict:
    if not MANIFEST.exists():
        return {}
    return json.loads(MANIFEST.read_text())


def policy_path(robot: str, level: str) -> Path:
    """File of a shipped policy ('random', 'medium' or 'expert'); a clear error if not shipped."""
    entry = read_manifest().get(robot, {}).get(level)
    if entry is None:
        raise FileNotFoundError(
            f"no shipped {level} policy for {robot} in {MANIFEST}; train one with "
            f"`python datasets/sac.py --robot {robot}` and ship it with `python datasets/sac.py "
            f"--robot {robot} --ship`"
        )
    return POLICY_DIR / entry["file"]


def replay_paths(robot: str) -> list[Path]:
    """Shipped snapshots from initialization up to medium, in training order."""
    entry = read_manifest().get(robot, {})
    if "replay" not in entry:
        policy_path(robot, "medium")  # raises the same clear error
    return [POLICY_DIR / s["file"] for s in entry["replay"]]


def silence_mujoco() -> None:
    """MuJoCo 4 warns about `settotalmass` in half_cheetah.xml on every env build and appends the
    warning to ./MUJOCO_LOG.TXT; a no-op warning callback silences both."""
    import mujoco

    mujoco.set_mju_user_warning(lambda msg: None)
