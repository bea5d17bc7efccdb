"""results/tables.py: rows computed from records (offline -> online, best, commit, eval speed), and
records of unfinished runs refused."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "results"))
import tables  # noqa: E402


def entry(step, phase, normalized, episodes_per_s=None):
    e = {"step": step, "phase": phase, "returns": normalized, "normalized": normalized, "lengths": [[10, 10]] * 2}
    if episodes_per_s is not None:
        e["episodes_per_s"] = episodes_per_s
    return e


def record(**overrides):
    r = {
        "algorithm": "cal_ql", "dataset": "local/hopper/medium-v0", "command": ["algorithms/cal_ql.py", "--x"],
        "commit": "abc1234", "dirty": False, "device": "cpu", "tier": "short", "seeds": [0, 1], "num_seeds": 2,
        "total_steps": 100, "online_steps": 50, "wall_time_s": 120.0, "dataset_fingerprint": "5e3a9c01" + "0" * 56,
        "config": {"cql_alpha": 5.0, "normalize_rewards": False},
        "evaluations": [
            entry(100, "offline", [[10.0, 20.0], [30.0, 40.0]]),  # seeds 15, 35 -> 25 ± 10
            entry(50, "online", [[50.0, 50.0], [70.0, 70.0]], episodes_per_s=2.5),  # 60 ± 10
        ],
    }  # fmt: skip
    r.update(overrides)
    return r


def test_offline_to_online_row():
    row = tables.row(record())
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[2] == "25.0 ± 10.0 -> 60.0 ± 10.0"
    assert cells[3] == "+35.0 ± 0.0"  # online change: seed 0 15 -> 50, seed 1 35 -> 70
    assert cells[4] == "60.0 ± 10.0"  # best evaluation
    assert cells[5] == "10"  # median episode length of the last evaluation
    assert cells[8] == "100 updates + 50 env steps"
    assert cells[12] == "2.50"
    assert cells[13] == "abc1234"
    assert cells[14] == "5e3a9c01" and cells[15] == "cql_alpha 5.0, normalize_rewards False"
    assert "(dirty)" in tables.row(record(dirty=True))
    offline_only = tables.row(record(online_steps=0, evaluations=record()["evaluations"][:1]))
    assert [c.strip() for c in offline_only.strip("|").split("|")][2:4] == ["25.0 ± 10.0", ""]


def test_generate_and_add(tmp_path, monkeypatch):
    monkeypatch.setattr(tables, "RECORDS", tmp_path / "records")
    monkeypatch.setattr(tables, "PLOTS", tmp_path / "plots")
    run = tmp_path / "run"
    run.mkdir()
    unfinished = record()
    unfinished["evaluations"] = unfinished["evaluations"][:1]  # the online phase never ran
    (run / "record.json").write_text(json.dumps(unfinished))
    with pytest.raises(SystemExit, match="not finished"):
        tables.add(run)
    (run / "record.json").write_text(json.dumps(record()))
    target = tables.add(run)
    assert target == tmp_path / "records" / "cal_ql" / "local-hopper-medium-v0__short.json"
    text = tables.generate()
    assert "| cal_ql | local/hopper/medium-v0 | 25.0 ± 10.0 -> 60.0 ± 10.0 |" in text
    assert (tmp_path / "plots" / "cal_ql__local-hopper-medium-v0__short.png").stat().st_size > 0


def table_rows(text: str, heading: str = "## Tier: short") -> list[str]:
    """First cells of the rows of the table under `heading` (header row first)."""
    block = text.split(heading, 1)[1].split("\n\n")[1]
    return [line.split("|")[1].strip() for line in block.splitlines() if line.startswith("| ")]


def test_bc_rows_first_and_filtered_bc_named_apart(tmp_path, monkeypatch):
    monkeypatch.setattr(tables, "RECORDS", tmp_path / "records")
    monkeypatch.setattr(tables, "PLOTS", tmp_path / "plots")
    monkeypatch.setattr(tables, "FINDINGS", tmp_path / "findings.md")
    offline = dict(online_steps=0, evaluations=[entry(100, "offline", [[10.0, 20.0], [30.0, 40.0]])])
    for algo, config in [("iql", {}), ("bc", {"top_fraction": 0.1}), ("bc", {"top_fraction": 1.0}), ("cql", {})]:
        r = record(algorithm=algo, config=config, **offline)
        path = tables.record_name(r)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(r))
    assert sorted(p.name for p in (tmp_path / "records" / "bc").iterdir()) == [
        "local-hopper-medium-v0__short.json", "local-hopper-medium-v0__short__top10.json"]  # fmt: skip
    rows = table_rows(tables.generate())
    assert rows[1:] == ["BC", "10% BC", "cql", "iql"]  # after the header
    run = tmp_path / "run"
    run.mkdir()
    (run / "record.json").write_text(json.dumps(record(algorithm="iql", config={"beta": 0.0}, **offline)))
    assert tables.add(run, "beta0").name == "local-hopper-medium-v0__short__beta0.json"
    rows = table_rows(tables.generate())
    assert rows[1:] == ["BC", "10% BC", "cql", "iql", "iql [beta0]"]


# --- the aggregate: interquartile mean and stratified bootstrap ---------------------------------
def test_iqm_hand_computed():
    assert tables.iqm(np.arange(1.0, 9.0)) == 4.5  # 8 scores: 2 cut from each end, mean of 3, 4, 5, 6
    assert tables.iqm([1.0, 2.0, 3.0, 4.0, 100.0]) == 3.0  # int(1.25) = 1 cut from each end
    assert tables.iqm([[0.0, 0.0, 0.0], [100.0, 100.0, 100.0]]) == 50.0


def test_bootstrap_resamples_within_each_dataset():
    # Resampled within each dataset, every draw keeps three 0s and three 100s: the interval is one
    # point. A bootstrap over the pooled scores would draw other mixes and widen it.
    assert tables.stratified_bootstrap_ci([np.zeros(3), np.full(3, 100.0)]) == (50.0, 50.0)
    per_task = [np.array([0.0, 10.0, 20.0]), np.array([50.0, 60.0, 70.0])]
    lo, hi = tables.stratified_bootstrap_ci(per_task)
    point = tables.iqm(np.concatenate(per_task))
    assert 0.0 <= lo < point < hi <= 70.0
    assert tables.stratified_bootstrap_ci(per_task) == (lo, hi)  # fixed seed: tables regenerate identically


def test_aggregate_needs_every_dataset_and_tables_regenerate_identically(tmp_path, monkeypatch):
    monkeypatch.setattr(tables, "RECORDS", tmp_path / "records")
    monkeypatch.setattr(tables, "PLOTS", tmp_path / "plots")
    monkeypatch.setattr(tables, "FINDINGS", tmp_path / "findings.md")
    monkeypatch.setattr(tables, "PUBLISHED", tmp_path / "published.json")
    scores = {"local/a/x-v0": [[0.0], [10.0], [20.0]], "local/b/y-v0": [[50.0], [60.0], [70.0]]}
    records = [
        record(algorithm="iql", dataset=d, online_steps=0, evaluations=[entry(100, "offline", s)])
        for d, s in scores.items()
    ] + [record(algorithm="cql", dataset="local/a/x-v0", online_steps=0,
                evaluations=[entry(100, "offline", [[5.0], [5.0]])])]  # fmt: skip
    rows = tables.aggregate(records, list(scores))
    lo, hi = tables.stratified_bootstrap_ci([np.array([0.0, 10.0, 20.0]), np.array([50.0, 60.0, 70.0])])
    assert rows == ["| cql | 1 of 2 |  |  |", f"| iql | 2 of 2 | 35.0 | [{lo:.1f}, {hi:.1f}] |"]
    for r in records:
        path = tables.record_name(r)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(r))
    assert tables.generate() == tables.generate()


def test_aggregate_counts_only_the_grids_cells():
    """A record made with a grid cell's file and flags counts; an experiment on the same data (RAVL on
    the true dynamics, IQL with another beta filed under its own name) does not, though the tier table
    still lists it."""
    import grid

    cell = grid.cells_of("short", ["local/hopper/medium-v0"], ["iql"])[0]
    config = {k.replace("-", "_"): v for k, v in grid.flag_values(cell.flags).items()}
    build = "0f6e35fb" + "0" * 56
    scores = [entry(100, "offline", [[40.0], [50.0]])]
    in_grid = record(algorithm="iql", online_steps=0, config=config, dataset_fingerprint=build, evaluations=scores)
    experiment = record(algorithm="iql", online_steps=0, config={**config, "beta": 0.0}, _variant="beta0",
                        dataset_fingerprint=build, evaluations=scores)  # fmt: skip
    true_dynamics = record(algorithm="ravl", online_steps=0, dataset_fingerprint=build, evaluations=scores,
                           config={"true_dynamics": True, "num_critics": 2, "eta": 0.0})  # fmt: skip
    assert grid.matches(in_grid, cell) and not grid.matches(experiment, cell)
    rows = [line for line in tables.aggregate_section([in_grid, true_dynamics], "short") if line.startswith("| ")]
    assert rows[1:] == ["| iql | 1 of 4 |  |  |"]  # rows[0]: the header
    rows = [line for line in tables.aggregate_section([experiment], "short") if line.startswith("| ")]
    assert rows[1:] == []


@pytest.mark.parametrize("algo", ["iql", "cql", "cal_ql", "dt", "famo2o", "bc", "ravl", "morec", "reinflow"])
def test_benchmark_adapters_follow_the_algorithm_files(algo):
    """results/benchmark.py reaches into each file's make_agent, resolve and chunks: a file that
    changes them must change the adapter too (a chunk of two updates, traced)."""
    import importlib

    import jax

    sys.path.insert(0, str(REPO / "algorithms"))
    import benchmark

    setup = benchmark.SETUPS[algo](importlib.import_module(algo), 4)
    keys = jax.numpy.stack([jax.random.key(0)])
    state = jax.eval_shape(jax.vmap(setup.init), keys)  # traced, not compiled: the test stays cheap
    state, _, metrics = jax.eval_shape(setup.make_chunk(2), state, keys, setup.data, setup.hp)
    assert metrics and all(v.shape == (1, 2) for v in jax.tree_util.tree_leaves(metrics))


def test_peer_comparison_keeps_no_machine_path_and_shows_in_the_table(tmp_path, monkeypatch):
    import benchmark
    import peer_benchmark

    assert peer_benchmark.retyped(["--jax-corl", "/home/me/JAX-CORL", "--rounds", "2"]) == [
        "--jax-corl", "JAX-CORL", "--rounds", "2"]  # fmt: skip
    assert peer_benchmark.retyped(["--jax-corl=/x/y"]) == ["--jax-corl=JAX-CORL"]
    record = {"device": "cpu", "cpu_count": 2, "date": "2026-12-02", "peer": {"commit": "d747dd8ad4fc"},
              "updates_per_s": {"jax_corl": [250.0, 240.0], "jaxorl_scan": [300.0, 312.0],
                                "jaxorl_plain": [280.0, 290.0]},
              "ratio_scan_over_jax_corl": [1.2, 1.3]}  # fmt: skip
    (tmp_path / "peer_iql__cpu.json").write_text(json.dumps(record))
    monkeypatch.setattr(benchmark, "OUT", tmp_path)
    rows = benchmark.peer_rows()
    assert (
        rows[-1]
        == "| cpu (2 cores) | 2026-12-02 | d747dd8 | 250.0, 240.0 | 300.0, 312.0 | 280.0, 290.0 | 1.20x, 1.30x |"
    )
    assert "peer_iql" not in benchmark.table()  # the per-algorithm table skips the peer files


def test_gpu_checks_and_evaluation_files_show_in_their_own_sections(tmp_path, monkeypatch):
    """gpu_checks.sh's summary with the record of its finished run (evaluation seconds summed: 10 + 5),
    a run that did not finish (blank), the sweep's ratio against its target; `--eval`'s file."""
    import benchmark

    checks = {
        "device": "NVIDIA H200",
        "date": "2026-12-04",
        "commit": "abc1234",
        "iql_1M_x5": {"updates": 1000000, "seeds": 5, "wall_s": 331.9},
        "iql_sweep": {"updates": 100000, "members": 45, "wall_s": 80.0, "one_seed_wall_s": 30.0, "ratio": 2.67},
    }
    record = {
        "wall_time_s": 321.6,
        "evaluations": [{"eval_seconds": 10.0}, {"eval_seconds": 5.0}],
        "final": {"normalized_mean": 101.96, "normalized_std": 2.97},
    }
    ev = {"device": "cpu", "cpu_count": 2, "date": "2026-12-04", "commit": "abc1234", "env": "Hopper-v5",
          "runs": [{"members": 5, "episodes": 10, "workers": 0, "seconds": 10.0, "episodes_per_s": 5.0,
                    "env_steps_per_s": 5000, "mean_length": 1000.0}]}  # fmt: skip
    (tmp_path / "gpu_checks__NVIDIA-H200.json").write_text(json.dumps(checks))
    (tmp_path / "gpu_iql_1M_x5__NVIDIA-H200.json").write_text(json.dumps(record))
    (tmp_path / "eval__cpu.json").write_text(json.dumps(ev))
    monkeypatch.setattr(benchmark, "OUT", tmp_path)
    rows = benchmark.gpu_rows()
    assert rows[-3].endswith("| 5 | 331.9 | 321.6 | 15.0 | 102.0 ± 3.0 | under 300 s | no |")
    assert rows[-2].endswith("| 100000 | 1 | 30.0 |  |  |  |  |  |")  # finished, but no record kept
    assert rows[-1].endswith("| 45 | 80.0 |  |  |  | under 3x one seed's wall (2.67x) | yes |")
    assert benchmark.evaluation_rows()[-1] == (
        "| cpu (2 cores) | 2026-12-04 | abc1234 | Hopper-v5 | 5 x 10 | 0 | 10.0 | 5.0 | 5000 | 1000.0 |"
    )
    table = benchmark.table()  # the per-algorithm rows skip these files (no scan_vmap)
    assert "## Whole IQL runs on a GPU" in table and "## Evaluation" in table


def test_matmuls_of_a_lowered_program_are_found_with_their_flops(tmp_path, monkeypatch):
    """--matmuls reads every dot_general of a lowered program with its shapes and dimension numbers;
    FLOPs by hand: 2 x batch x contracted x free dimensions."""
    import benchmark
    import jax
    import jax.numpy as jnp

    def program(x, w, a, b):
        h = jnp.einsum("btc,cd->btd", x, w)  # (4, 5, 3) @ (3, 6): 2 * 20 * 3 * 6 = 720
        g = jnp.einsum("btc,btd->cd", x, h)  # contracts b and t: 2 * 20 * 3 * 6 = 720
        return h.sum() + g.sum() + jnp.einsum("nij,njk->nik", a, b).sum()  # batched: 2 * 7 * 2 * 3 * 4 = 336

    shapes = [(4, 5, 3), (3, 6), (7, 2, 3), (7, 3, 4)]
    text = jax.jit(program).lower(*(jnp.ones(s) for s in shapes)).as_text()
    found = benchmark.parse_matmuls(text)
    assert sorted(benchmark.matmul_flops(*k) * n for k, n in found.items()) == [336, 720, 720]
    assert found[((4, 5, 3), (3, 6), (((2,), (0,)), ((), ())))] == 1
    assert found[((7, 2, 3), (7, 3, 4), (((2,), (1,)), ((0,), (0,))))] == 1
    record = {"algorithm": "dt", "network": "GPT", "device": "cpu", "cpu_count": 2, "commit": "abc1234",
              "matmuls": [{"count": 3}, {"count": 2}], "matmul_gflop": 10.0, "matmul_ms": 100.0, "update_ms": 200.0,
              "gflop_per_update": 12.0, "matmul_peak_gflops": 300.0}  # fmt: skip
    (tmp_path / "matmuls__dt__cpu.json").write_text(json.dumps(record))
    monkeypatch.setattr(benchmark, "OUT", tmp_path)
    # 5 matmuls of 2 shapes, 10 GFLOP in 0.1 s = 100 GFLOP/s, half the update; ceiling 12 / 0.1 / 300 = 40%
    assert (
        benchmark.matmul_rows()[-1]
        == "| dt | GPT | cpu (2 cores) | abc1234 | 5 (2) | 10.0 | 100.0 | 100.0 | 200.0 | 50% | 300.0 | 40 |"
    )
    assert "## The updates' matmuls" in benchmark.table()  # the per-algorithm rows skip the file (no scan_vmap)


def test_phase_costs_combine_a_runs_timings_into_the_throughput_table(tmp_path):
    """Two evaluations' timings: 2 rounds of 1.0 s at 300 steps/s (150 kept/s) and 1 round of 4.0 s at
    150 steps/s (75 kept/s) -> 6.0 s for 1200 steps: 2.0 s a round, 200 steps/s, 100 kept/s; 100
    updates at 50/s and 300 at 150/s -> 400 updates in 4 s: 100/s. A record without timings (made
    before them) gives no row; a MOPO record is labelled as the tables label it."""
    import benchmark

    timing = [
        {"rollout_rounds": 2, "rollout_round_s": 1.0, "model_steps_per_s": 300.0, "kept_transitions_per_s": 150.0,
         "updates": 100, "updates_per_s": 50.0},
        {"rollout_rounds": 1, "rollout_round_s": 4.0, "model_steps_per_s": 150.0, "kept_transitions_per_s": 75.0,
         "updates": 300, "updates_per_s": 150.0},
    ]  # fmt: skip
    run = record(algorithm="morec", online_steps=0, config={"no_filter": True},
                 dynamics={"train_seconds": 61.5, "reward": {"train_seconds": 12.0}})  # fmt: skip
    run["evaluations"] = [{**entry(50, "offline", [[1.0]]), "timing": t} for t in timing]
    assert benchmark.phase_costs(run) == {
        "model_training_s": 61.5, "reward_training_s": 12.0, "rollout_round_s": 2.0, "model_steps_per_s": 200.0,
        "kept_transitions_per_s": 100.0, "updates_per_s": 100.0, "env_steps_per_s": None,
    }  # fmt: skip
    (tmp_path / "morec").mkdir()
    (tmp_path / "morec" / "local-hopper-medium-v0__short__mopo.json").write_text(json.dumps(run))
    old = record(algorithm="ravl", online_steps=0)
    (tmp_path / "ravl").mkdir()
    (tmp_path / "ravl" / "local-hopper-medium-v0__short.json").write_text(json.dumps(old))
    rows = [r for r in benchmark.phase_rows(tmp_path) if r.startswith("| ") and "---" not in r][1:]
    assert rows == ["| morec [mopo] | local/hopper/medium-v0 | 2 | cpu | abc1234 | 61.5 | 12.0 | 2.0 | 200.0 | 100.0 "
                    "| 100.0 |  |"]  # fmt: skip
    assert benchmark.phase_rows(tmp_path / "ravl")[-1].startswith("No record")


def test_morec_and_mopo_rollouts_tabled_side_by_side():
    """Each record's evaluations' rollout means averaged: MOREC's rounds (4, 3) and (6, 5) -> 5.000 and
    4.000; MOPO's record (made before `in_distribution_length` existed in one round) leaves that cell empty."""

    def rounds(*pairs):
        return [{"rollout/mean_length": a, "rollout/in_distribution_length": b, "filter/rejected_candidates": 0.5,
                 "filter/rejected_transitions": 0.25, "filter/dynamics_reward": 0.75} for a, b in pairs]  # fmt: skip

    def morec(no_filter, rollouts):
        run = record(algorithm="morec", online_steps=0, config={"no_filter": no_filter})
        run["evaluations"] = [{**entry(50 * (i + 1), "offline", [[10.0], [30.0]]), "rollouts": x}
                              for i, x in enumerate(rollouts)]  # fmt: skip
        return run

    mopo_rounds = rounds((10, 2), (10, 2))
    del mopo_rounds[0]["rollout/in_distribution_length"]
    lines = tables.rollout_section([morec(False, rounds((4, 3), (6, 5))), morec(True, mopo_rounds)])
    rows = [line for line in lines if line.startswith("| morec")]
    assert rows == [
        "| morec | local/hopper/medium-v0 | short | 2 | 20.0 ± 10.0 | 5.000 | 4.000 | 0.500 | 0.250 | 0.750 |",
        "| morec [mopo] | local/hopper/medium-v0 | short | 2 | 20.0 ± 10.0 | 10.000 |  | 0.500 | 0.250 | 0.750 |",
    ]
    assert tables.rollout_section([record()]) == []  # no MOREC record: no section


def test_ravl_runs_on_the_true_dynamics_are_named_apart():
    true = record(algorithm="ravl", online_steps=0, config={"true_dynamics": True, "num_critics": 2, "eta": 0.0})
    assert tables.label(true) == "ravl [true-n2-eta0]"
    assert tables.record_name(true).name == "local-hopper-medium-v0__short__true-n2-eta0.json"
    assert tables.label(record(algorithm="ravl", online_steps=0, config={"true_dynamics": False})) == "ravl"


def test_famo2o_beta_spread_tabled_at_the_last_offline_and_online_evaluations():
    def beta(mean, std):
        return {"mean": mean, "std": std, "p5": [1.0, 2.0], "p50": [2.0, 2.0], "p95": [4.0, 5.0]}

    run = record(algorithm="famo2o", config={"beta_min": 1.0, "beta_max": 5.0})
    run["evaluations"] = [
        {**entry(50, "offline", [[1.0], [3.0]]), "beta": beta([9.0, 9.0], [9.0, 9.0])},  # not the last offline one
        {**entry(100, "offline", [[1.0], [3.0]]), "beta": beta([2.0, 3.0], [1.0, 0.5])},
        {**entry(50, "online", [[1.0], [3.0]]), "beta": beta([4.0, 4.5], [0.25, 0.75])},
    ]
    rows = [line for line in tables.beta_section([run, record()]) if line.startswith("| famo2o")]
    assert rows == [
        "| famo2o | local/hopper/medium-v0 | 2 | 1.0-5.0 | offline (100) | 2.50 | 0.75 | 1.50-4.50 |",
        "| famo2o | local/hopper/medium-v0 | 2 | 1.0-5.0 | online (50) | 4.25 | 0.50 | 1.50-4.50 |",
    ]
    assert tables.beta_section([record()]) == []


def machine_paths(value, where=""):
    """Every string inside `value` (nested lists and dicts) that is an absolute path, with where it is."""
    if isinstance(value, dict):
        return [p for k, v in value.items() for p in machine_paths(v, f"{where}.{k}")]
    if isinstance(value, list):
        return [p for i, v in enumerate(value) for p in machine_paths(v, f"{where}[{i}]")]
    return (
        [f"{where}: {value}"]
        if isinstance(value, str) and (value.startswith(("/", "~")) or value[1:3] == ":\\")
        else []
    )


def test_machine_paths_found_anywhere_in_a_record():
    found = machine_paths({"command": ["algorithms/bc.py", "--out-dir", "/work/runs"], "config": {"out_dir": "runs"}})
    assert found == [".command[2]: /work/runs"]
    assert machine_paths({"config": {"dynamics_path": "~/m.msgpack", "dataset": "local/hopper/medium-v0"}}) == [
        ".config.dynamics_path: ~/m.msgpack"]  # fmt: skip


@pytest.mark.parametrize(
    "path",
    sorted((REPO / "results").glob("records/*/*.json")) + sorted((REPO / "results").glob("throughput/*.json")),
    ids=lambda p: f"{p.parent.name}/{p.name}",
)
def test_committed_results_carry_no_path_of_the_machine_that_made_them(path):
    """A record's command and config read as a user would retype them (issue: the benchmark grid)."""
    data = json.loads(path.read_text())
    assert machine_paths({k: data.get(k) for k in ("command", "config")}) == []
