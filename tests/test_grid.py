"""results/grid.py: cells from tiers, records matched to cells, and a grid stopped by --max-minutes
and continued over several commands ending with the records of one uninterrupted command."""

import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "results"))
import grid  # noqa: E402


def test_cells_carry_each_tiers_budget():
    cells = {c.name: c for c in grid.cells_of("short", ["local/hopper/medium-v0"], list(grid.CELLS))}
    flags = {name: grid.flag_values(c.flags) for name, c in cells.items()}
    assert flags["iql"] == {"total_steps": "100000", "num_seeds": "3", "online_steps": "0"}
    assert flags["iql_o2o"] == {"total_steps": "100000", "num_seeds": "3", "online_steps": "50000"}
    assert flags["cal_ql"]["online_steps"] == "10000" and flags["cql"]["eval_every"] == "2000"
    assert flags["bc10"]["top_fraction"] == "0.1" and cells["bc10"].algo == "bc"
    paper = {
        c.name: grid.flag_values(c.flags) for c in grid.cells_of("paper", ["local/hopper/medium-v0"], ["dt", "famo2o"])
    }
    assert paper["dt"] == {"total_steps": "100000", "num_seeds": "5"}
    assert paper["famo2o"]["online_steps"] == "1000000"


def test_a_record_matches_only_its_own_cell():
    cells = {c.name: c for c in grid.cells_of("short", ["local/hopper/medium-v0"], ["iql", "iql_o2o", "bc", "bc10"])}
    record = {"algorithm": "iql", "dataset": "local/hopper/medium-v0",
              "config": {"total_steps": 100000, "num_seeds": 3, "online_steps": 0, "beta": 3.0}}  # fmt: skip
    assert grid.matches(record, cells["iql"]) and not grid.matches(record, cells["iql_o2o"])
    assert not grid.matches({**record, "dataset": "local/hopper/expert-v0"}, cells["iql"])
    bc = {"algorithm": "bc", "dataset": "local/hopper/medium-v0",
          "config": {"total_steps": 100000, "num_seeds": 3, "top_fraction": 0.1}}  # fmt: skip
    assert grid.matches(bc, cells["bc10"]) and not grid.matches(bc, cells["bc"])
    morec = {c.name: c for c in grid.cells_of("short", ["local/hopper/medium-v0"], ["morec", "mopo"])}
    config = {"total_steps": 50000, "num_seeds": 2, "model_max_epochs": 30, "rollouts_per_epoch": 200,
              "reward_iterations": 100, "snapshot_interval": 5}  # fmt: skip
    mopo = {"algorithm": "morec", "dataset": "local/hopper/medium-v0", "config": {**config, "no_filter": True}}
    assert grid.matches(mopo, morec["mopo"]) and not grid.matches(mopo, morec["morec"])
    filtered = {**mopo, "config": {**config, "no_filter": False}}
    assert grid.matches(filtered, morec["morec"]) and not grid.matches(filtered, morec["mopo"])


def test_a_record_of_older_code_leaves_its_cell_to_be_run_again(tmp_path):
    (cell,) = grid.cells_of("short", ["local/hopper/medium-v0"], ["ravl"])
    config = {"total_steps": 10000, "num_seeds": 2, "model_max_epochs": 20, "rollouts_per_epoch": 5000}
    record = {"algorithm": "ravl", "dataset": "local/hopper/medium-v0", "config": config,
              "dataset_fingerprint": grid.BUILDS["local/hopper/medium-v0"], "commit": "3c919d5" + "0" * 33}  # fmt: skip
    assert grid.matches(record, cell) and grid.older_code(record, cell)
    assert not grid.recorded(cell, [record])
    newer = {**record, "commit": "fe7a080" + "0" * 33}
    assert grid.recorded(cell, [newer]) and not grid.older_code(newer, cell)
    # filed: the old record in results/records is skipped, so the grid runs the cell again
    path = tmp_path / "ravl" / "local-hopper-medium-v0__short.json"
    path.parent.mkdir()
    path.write_text(json.dumps(record))
    fingerprints = {cell.dataset: record["dataset_fingerprint"]}
    assert grid.filed(cell, tmp_path, fingerprints) is None
    path.write_text(json.dumps(newer))
    assert grid.filed(cell, tmp_path, fingerprints) == path


def test_mopo_starts_on_the_model_morecs_run_saved(tmp_path):
    """The mopo cell's new run loads the morec cell's saved model (the same flags train the same model:
    test_morec's reused-model test ends where the run that trained it does), never one of code a later
    fix changed; its own run resumes."""
    import benchmark

    runs = tmp_path / "runs"
    cells = {c.name: c for c in grid.cells_of("short", ["local/hopper/medium-v0"], ["morec", "mopo"])}
    config = {"total_steps": 50000, "num_seeds": 2, "model_max_epochs": 30, "rollouts_per_epoch": 200,
              "reward_iterations": 100, "snapshot_interval": 5}  # fmt: skip

    def run_dir(cell, name, no_filter, commit="0123abc"):
        path = cell.out_dir(runs) / "morec" / name
        path.mkdir(parents=True)
        record = {"algorithm": "morec", "dataset": cell.dataset, "config": {**config, "no_filter": no_filter},
                  "commit": commit}  # fmt: skip
        (path / "record.json").write_text(json.dumps(record))
        return path

    # A run of code a later fix changed: its model is not shared, the run itself not continued.
    stale = run_dir(cells["morec"], "run-0", False, commit=grid.OLDER_CODE["morec"][-1])
    (stale / "dynamics.msgpack").write_bytes(b"old model")
    assert "--dynamics-path" not in grid.command(cells["mopo"], runs)
    assert "--resume" not in grid.command(cells["morec"], runs)
    morec = run_dir(cells["morec"], "run-1", False)
    fresh = grid.command(cells["mopo"], runs)
    assert "--dynamics-path" not in fresh and "--no-filter" in fresh  # the model is not saved yet
    (morec / "dynamics.msgpack").write_bytes(b"model")
    cmd = grid.command(cells["mopo"], runs)
    assert cmd == [*fresh[:-2], "--dynamics-path", str(morec / "dynamics.msgpack"), *fresh[-2:]]  # then --out-dir
    assert "--dynamics-path" not in grid.command(cells["morec"], runs)  # morec itself resumes its own run
    mopo = run_dir(cells["mopo"], "run-2", True)
    assert grid.command(cells["mopo"], runs)[2:] == ["--resume", str(mopo)]
    # The throughput table does not count the loaded model's training for the run that loaded it.
    timed = {"train_seconds": 900.0, "reward": {"train_seconds": 50.0}}
    record = {"evaluations": [], "dynamics": {**timed, "source": str(morec / "dynamics.msgpack")}}
    assert benchmark.phase_costs(record)["model_training_s"] == "loaded"
    assert benchmark.phase_costs({**record, "dynamics": {**timed, "source": "trained"}})["model_training_s"] == 900.0


def evaluations(records: Path) -> dict:
    out = {}
    for path in sorted(records.rglob("*.json")):
        record = json.loads(path.read_text())
        out[path.relative_to(records).as_posix()] = (
            record["command"],
            [(e["phase"], e["step"], e["returns"]) for e in record["evaluations"]],
        )
    return out


def test_interrupted_grid_ends_with_the_records_of_one_uninterrupted_command(pendulum_dataset, tmp_path, capsys):
    cells = ["--tier", "tiny", "--datasets", pendulum_dataset, "--algorithms", "iql_o2o"]
    assert grid.main([*cells, "--runs", str(tmp_path / "a"), "--records", str(tmp_path / "ra")]) == 0
    stopped = [*cells, "--runs", str(tmp_path / "b"), "--records", str(tmp_path / "rb")]
    commands = 0
    while True:  # each command stops the run the next continues: 9 s for the first, 40% more for each next
        # (a command spends about 6 s starting the run; a fixed limit under load would never end)
        minutes = 0.15 * 1.4**commands
        commands += 1
        rc = grid.main([*stopped, "--max-minutes", f"{minutes:.3f}"])
        if rc == 0:
            break
        assert rc == 3 and commands < 15, capsys.readouterr().out
    out = capsys.readouterr().out
    assert commands >= 2 and "stopped at the time limit" in out
    uninterrupted, continued = evaluations(tmp_path / "ra"), evaluations(tmp_path / "rb")
    assert sorted(uninterrupted) == ["iql/test-pendulum-pd-v0__short__o2o.json"]
    assert continued == uninterrupted
    assert not any(str(tmp_path) in " ".join(cmd) for cmd, _ in continued.values())  # no path of this machine
    # A filled grid runs nothing.
    assert grid.main(stopped) == 0
    assert capsys.readouterr().out.strip().endswith(": filed")


def test_ctrl_c_stops_the_cells_run_too_and_says_so_in_one_line(pendulum_dataset, tmp_path):
    """A cell's run lives in its own session (a terminal's Ctrl-C does not reach it): interrupting the
    grid command stops that run as well, and ends with one line, no traceback."""
    import os
    import signal
    import subprocess
    import time

    runs = tmp_path / "runs"
    cmd = [sys.executable, "results/grid.py", "--tier", "tiny", "--datasets", pendulum_dataset, "--algorithms", "iql",
           "--runs", str(runs), "--records", str(tmp_path / "records")]  # fmt: skip
    # Started with SIGINT ignored, as `cmd &` in a script without job control starts it: grid.py must
    # still stop on it (`kill -INT` is how a background grid is stopped).
    proc = subprocess.Popen(cmd, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))  # fmt: skip
    started = time.time()
    while not any(runs.rglob("config.json")):  # the cell's run has begun (it takes 15-30 s to finish)
        assert proc.poll() is None and time.time() - started < 120
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=90)
    assert proc.returncode == 130, out + err
    assert "Traceback" not in out + err
    assert out.strip().splitlines()[-1].startswith("interrupted: the running cell stopped")
    assert not [cmd for cmd in command_lines() if str(runs) in cmd], "the cell's run outlived the grid command"


def command_lines() -> list[str]:
    """The command lines of this machine's processes (Linux)."""
    found = []
    for pid in Path("/proc").iterdir():
        try:
            found.append((pid / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"))
        except OSError:  # not a process, or one that just ended
            continue
    return found
