"""No batched QR in any algorithm's initialization.

Orthogonal init is a QR decomposition. Under `vmap` (a vmapped ensemble or a vmapped init over seeds)
it becomes a batched QR, which jaxlib's CPU LAPACK kernel splits over XLA's intra-op thread pool and
then waits on from inside that same pool. Two such QRs running at once on a 2-thread pool wait on each
other forever: a Cal-QL run hung this way (both pool threads in `sgeqrf` -> `ParallelBatchMap`, seen
with gdb). The hang is a race, so this test checks the cause instead: every QR in the traced init is
a single matrix.
"""

import dataclasses
import sys
from pathlib import Path
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "algorithms"))
import cal_ql  # noqa: E402
import cql  # noqa: E402
import famo2o  # noqa: E402
import iql  # noqa: E402
import morec  # noqa: E402
import ravl  # noqa: E402
import reinflow  # noqa: E402

OBS_DIM, ACTION_DIM = 5, 2


def equations(jaxpr):
    """Every equation of a jaxpr, inside nested jit/scan/cond bodies too."""
    for eqn in jaxpr.eqns:
        yield eqn
        for value in eqn.params.values():
            for sub in value if isinstance(value, (list, tuple)) else [value]:
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    yield from equations(inner)


def qr_operand_shapes(fn, *args) -> list[tuple[int, ...]]:
    jaxpr = jax.make_jaxpr(fn)(*args).jaxpr
    return [eqn.invars[0].aval.shape for eqn in equations(jaxpr) if eqn.primitive.name == "qr"]


HOPPER_MEDIUM = SimpleNamespace(domain="locomotion", robot="hopper", level="medium")  # what resolve reads


def init_of(name: str):
    if name == "morec":  # PyTorch-style init: no QR at all
        return morec.make_agent(morec.Args(hidden_dims=(32, 32)), OBS_DIM, ACTION_DIM)[0], (jax.random.key(0),)
    if name == "ravl":  # torch-style and EDAC inits: no QR at all, even with the critics' vmapped init
        args = dataclasses.replace(ravl.Args(hidden_dims=(32, 32)), **ravl.DEFAULTS)
        return ravl.make_agent(args, OBS_DIM, ACTION_DIM)[0], (jax.random.key(0),)
    if name == "reinflow":  # torch's default init: no QR at all
        args = reinflow.resolve(reinflow.Args(hidden_dims=(32, 32, 32)), HOPPER_MEDIUM)
        return reinflow.make_agent(args, OBS_DIM, ACTION_DIM)[0], (jax.random.key(0),)
    if name in ("iql", "famo2o"):
        module = {"iql": iql, "famo2o": famo2o}[name]
        args = module.resolve(module.Args(hidden_dims=(32, 32)), HOPPER_MEDIUM)
        init = module.make_agent(args, OBS_DIM, ACTION_DIM)[0]
        return init, (jax.random.key(0),)
    module = {"cql": cql, "cal_ql": cal_ql}[name]
    args = module.resolve(module.Args(hidden_dims=(32, 32)), HOPPER_MEDIUM)
    init = module.make_agent(args, OBS_DIM, ACTION_DIM)[0]
    return init, (jax.random.key(0), jnp.zeros(OBS_DIM), jnp.ones(OBS_DIM))


@pytest.mark.parametrize("name", ["iql", "cql", "cal_ql", "famo2o", "reinflow", "ravl", "morec"])
def test_init_has_only_unbatched_qr(name):
    init, args = init_of(name)
    shapes = qr_operand_shapes(init, *args)
    if name not in ("reinflow", "ravl", "morec"):  # the others use orthogonal init: the check must see it
        assert shapes, "expected orthogonal init (QR) in the network init"
    assert all(len(s) == 2 for s in shapes), f"batched QR in {name}'s init: {shapes}"


def test_the_check_sees_a_vmapped_init():
    """The same check flags a vmap over seeds of IQL's init (what the files avoid)."""
    init, (key,) = init_of("iql")
    shapes = qr_operand_shapes(jax.vmap(init), jax.random.split(key, 2))
    assert shapes and all(len(s) == 3 for s in shapes)


@pytest.mark.parametrize("module", [cql, cal_ql])
def test_twin_critics_are_independent(module):
    critic = module.Critics((16, 16))
    obs, act = jnp.ones((4, OBS_DIM)), jnp.ones((4, ACTION_DIM))
    params = critic.init(jax.random.key(0), obs, act)
    q = critic.apply(params, obs, act)
    assert q.shape == (2, 4)
    assert not jnp.allclose(q[0], q[1])
