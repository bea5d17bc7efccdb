"""The member axis: every seed of every hyperparameter grid point, trained as one program.

    points = sweep_points(args.sweep, args, SWEEPABLE)      # [{}] without --sweep
    hp = member_hyper(Hyper, args, points, num_seeds)       # each field shaped (members,)
    states = shard(tile(states, len(points)))               # per-seed states repeated per point

Member m is grid point m // num_seeds with seed m % num_seeds, so member (g, s) starts from the
same state and key as a single run of seed s with point g's values: a grid point of a sweep equals
the plain run with those values. `--sweep NAME=V1,V2 [NAME=...]` takes the product of the lists,
first name slowest. The hyperparameters are traced (vmapped with the states), so the whole grid
compiles once.

`vmap_members` is `jax.vmap` over the member axis, except that a single member runs unbatched:
XLA's CPU matmuls with a batch dimension of 1 are ~10% slower than plain ones (IQL's update, 2
cores), and one seed is the common case.

`shard` places the member axis on a 1-D mesh over every visible device (XLA's SPMD partitioner then
runs each device's members; with one device it changes nothing), and `replicate` puts shared data
on all of them. Results equal the unsharded program's.
"""

from __future__ import annotations

import functools
import itertools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from common.data import UserError


def sweep_points(sweep: tuple[str, ...], args: Any, allowed: tuple[str, ...]) -> list[dict]:
    """The grid of `--sweep NAME=V1,V2,...` items: a list of {name: value}; [{}] for none."""
    names, values = [], []
    for item in sweep:
        name, eq, listed = item.partition("=")
        name = name.strip().lstrip("-").replace("-", "_")
        if not eq or not listed.strip():
            raise UserError(f"--sweep {item!r}: write NAME=V1,V2,... (e.g. --sweep expectile=0.7,0.9)")
        if name not in allowed:
            raise UserError(f"--sweep {name}: not sweepable here; sweepable: {', '.join(allowed)}")
        if name in names:
            raise UserError(f"--sweep {name} is given twice")
        try:
            vals = [float(v) for v in listed.split(",")]
        except ValueError:
            raise UserError(f"--sweep {item!r}: the values must be numbers") from None
        if len(set(vals)) != len(vals):
            raise UserError(f"--sweep {item!r}: a value is repeated")
        names.append(name)
        values.append(vals)
    return [dict(zip(names, combo)) for combo in itertools.product(*values)]


def point_label(point: dict) -> str:
    """expectile=0.9,beta=10 (empty for no sweep)."""
    return ",".join(f"{k}={v:g}" for k, v in point.items())


def member_labels(points: list[dict], seeds: list[int]) -> list[str]:
    """One name per member, as errors and tensorboard tags show it."""
    return [f"{s} ({point_label(p)})" if p else str(s) for p in points for s in seeds]


def member_hyper(hyper_type: type, args: Any, points: list[dict], num_seeds: int, **values) -> Any:
    """A `Hyper` of float32 arrays shaped (members,): each field from the grid point, else from
    `values`, else from args."""

    def column(name):
        default = values[name] if name in values else getattr(args, name)
        return jnp.asarray([p.get(name, default) for p in points for _ in range(num_seeds)], jnp.float32)

    return hyper_type(*(column(name) for name in hyper_type._fields))


def vmap_members(fn, in_axes: tuple):
    """`jax.vmap(fn, in_axes)` over the leading member axis; with one member, `fn` on the squeezed
    arguments and the outputs given back their axis of 1 (same values, unbatched kernels)."""
    batched = jax.vmap(fn, in_axes=in_axes)

    @functools.wraps(fn)  # jit's name for it stays fn's (compile logs)
    def call(*args):
        mapped = [a for a, axis in zip(args, in_axes, strict=True) if axis is not None]
        sizes = {np.shape(x)[0] for x in jax.tree_util.tree_leaves(mapped)}
        if sizes != {1}:
            return batched(*args)
        squeeze = lambda tree: jax.tree_util.tree_map(lambda x: x[0], tree)  # noqa: E731
        out = fn(*(a if axis is None else squeeze(a) for a, axis in zip(args, in_axes, strict=True)))
        return jax.tree_util.tree_map(lambda x: x[None], out)

    return call


def tile(tree: Any, num_points: int) -> Any:
    """Per-seed arrays (seeds, ...) -> per-member arrays (points * seeds, ...)."""
    if num_points == 1:
        return tree
    return jax.tree_util.tree_map(lambda x: jnp.concatenate([x] * num_points), tree)


def mesh() -> Mesh:
    return Mesh(np.asarray(jax.devices()), ("members",))


def shard(tree: Any) -> Any:
    """The leading (member) axis split over all devices, where it divides evenly; else as it is."""
    n = jax.device_count()
    leaves = jax.tree_util.tree_leaves(tree)
    if n == 1 or not leaves or any(np.ndim(x) == 0 or np.shape(x)[0] % n for x in leaves):
        return tree
    return jax.device_put(tree, NamedSharding(mesh(), PartitionSpec("members")))


def replicate(tree: Any) -> Any:
    """Shared arrays (the dataset) on every device."""
    if jax.device_count() == 1:
        return tree
    return jax.device_put(tree, NamedSharding(mesh(), PartitionSpec()))
