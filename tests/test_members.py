"""The member axis (common/members.py), through iql.py: `--sweep` trains a hyperparameter grid and
its seeds as one program, each grid point equal to the single run with its values; the members are
sharded over devices with results equal to one device's; tables show one row per grid point."""

import json
import os
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import serialization
from helpers import only_run_dir, run_algorithm

from common.data import UserError
from common.members import member_hyper, member_labels, sweep_points, tile

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "algorithms"))
sys.path.insert(0, str(REPO / "results"))
import iql  # noqa: E402
import tables  # noqa: E402

TINY = dict(hidden_dims=(32, 32), batch_size=32, eval_episodes=2, total_steps=200, eval_every=100, no_log=True)
SWEEP = ("expectile=0.7,0.9", "beta=3,10")


def test_sweep_points_are_the_product_first_name_slowest():
    args = iql.Args()
    assert sweep_points((), args, iql.SWEEPABLE) == [{}]
    points = sweep_points(SWEEP, args, iql.SWEEPABLE)
    assert points == [{"expectile": 0.7, "beta": 3.0}, {"expectile": 0.7, "beta": 10.0},
                      {"expectile": 0.9, "beta": 3.0}, {"expectile": 0.9, "beta": 10.0}]  # fmt: skip
    for bad, message in [(("hidden_dims=1,2",), "not sweepable"), (("beta",), "NAME=V1,V2"),
                         (("beta=a,b",), "must be numbers"), (("beta=1,1",), "repeated"),
                         (("beta=1", "beta=2"), "given twice")]:  # fmt: skip
        with pytest.raises(UserError, match=message):
            sweep_points(bad, args, iql.SWEEPABLE)


def test_members_are_points_times_seeds():
    args = iql.Args(expectile=0.7, beta=3.0)
    points = sweep_points(("beta=1,2,4",), args, iql.SWEEPABLE)
    hp = member_hyper(iql.Hyper, args, points, num_seeds=2)
    np.testing.assert_allclose(hp.beta, [1, 1, 2, 2, 4, 4])  # member m: point m // 2, seed m % 2
    np.testing.assert_allclose(hp.expectile, [0.7] * 6)
    assert member_labels(points, [5, 6])[3] == "6 (beta=2)"
    stacked = tile({"w": jnp.arange(2.0)}, 3)["w"]  # per-seed state repeated per point
    np.testing.assert_array_equal(stacked, [0, 1, 0, 1, 0, 1])


def checkpoint_state(run_dir: Path):
    return serialization.msgpack_restore((run_dir / "checkpoint.msgpack").read_bytes())["state"]


@pytest.fixture(scope="module")
def sweep_run(pendulum_dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("sweep")
    record = iql.train(iql.Args(dataset=pendulum_dataset, out_dir=str(out), num_seeds=2, sweep=SWEEP, **TINY))
    return record, only_run_dir(out, "iql")


def test_a_grid_point_equals_the_single_run_with_its_values(sweep_run, pendulum_dataset, tmp_path):
    record, run_dir = sweep_run
    single = iql.train(iql.Args(dataset=pendulum_dataset, out_dir=str(tmp_path), num_seeds=2, expectile=0.9,
                                beta=3.0, **TINY))  # fmt: skip
    swept, alone = checkpoint_state(run_dir), checkpoint_state(only_run_dir(tmp_path, "iql"))
    for a, b in zip(jax.tree_util.tree_leaves(swept), jax.tree_util.tree_leaves(alone)):
        np.testing.assert_allclose(np.asarray(a)[4:6], np.asarray(b), atol=2e-4, rtol=2e-3)  # point 2, seeds 0-1
    point = record["final_per_point"][2]
    assert point["point"] == {"expectile": 0.9, "beta": 3.0}
    assert point["normalized_mean"] == pytest.approx(single["final"]["normalized_mean"], abs=1.0)
    assert np.shape(record["evaluations"][-1]["normalized"]) == (8, 2)
    assert record["sweep"]["points"][2] == point["point"]


def test_tables_show_one_row_per_grid_point(sweep_run):
    record, _ = sweep_run
    parts = tables.split_sweep(json.loads(json.dumps(record)))
    assert [tables.label(p) for p in parts] == [
        "iql [expectile=0.7,beta=3]", "iql [expectile=0.7,beta=10]", "iql [expectile=0.9,beta=3]",
        "iql [expectile=0.9,beta=10]",
    ]  # fmt: skip
    for part, point in zip(parts, record["final_per_point"]):
        cells = [c.strip() for c in tables.row(part).strip("|").split("|")]
        assert cells[2] == f"{point['normalized_mean']:.1f} ± {point['normalized_std']:.1f}"
        assert part["config"]["expectile"] == point["point"]["expectile"]
    assert tables.record_name(record).name == "test-pendulum-pd-v0__short__sweep.json"


def test_members_sharded_over_two_devices_equal_one_device(sweep_run, pendulum_dataset, tmp_path):
    _, run_dir = sweep_run
    flags = ["--dataset", pendulum_dataset, "--num-seeds", "2", "--sweep", *SWEEP, "--hidden-dims", "32", "32",
             "--batch-size", "32", "--eval-episodes", "2", "--total-steps", "200", "--eval-every", "100",
             "--no-log"]  # fmt: skip
    env = {"XLA_FLAGS": (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=2").strip()}
    proc = run_algorithm("iql", *flags, "--out-dir", tmp_path, cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "members sharded over 2 devices" in proc.stdout
    sharded, one = checkpoint_state(only_run_dir(tmp_path, "iql")), checkpoint_state(run_dir)
    for a, b in zip(jax.tree_util.tree_leaves(sharded), jax.tree_util.tree_leaves(one)):
        # equal up to float32 rounding: each device multiplies half the members' matrices
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, rtol=1e-5)
