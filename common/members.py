"""The member axis: every seed of every hyperparameter grid point, trained as one program.

    points = sweep_points(args.sweep, args, SWEEPABLE)      # [{}] without --sweep
    hp = member_hyper(Hyper, args, points, num_seeds)       # each field shaped (members,)
    states = shard(tile(states, len(points)))               # per-seed states repeated per point

Member m is grid point m // num_seeds with seed m % num_seeds, so member (g, s) starts from the
same state and key as a single run of seed s with point g's values: a grid point of a sweep equals
the plain run with those values. `--sweep NAME=V1,V2 [NAME=...]` takes the product of the lists,
first name slowest. The hyperparameters are traced (vmapped with the states), so the whole grid
compiles once.

`shard` places the member axis on a 1-D mesh over every visible device (XLA's SPMD partitioner then
runs each device's members; with one device it changes nothing), and `replicate` puts shared data
on all of them. Results equal the unsharded program's.
"""

from __future__ import annotations

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
