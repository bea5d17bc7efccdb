"""A run directory is a contract (common/logging.py), through iql.py: every bad input gives one line
on stderr, a non-zero exit and no folder; `--resume RUN_DIR` alone continues the run from its own
config, refuses flags that differ, leaves a finished run unchanged, and a run killed with SIGKILL in
its online phase resumes to the evaluations of an uninterrupted run."""

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import gymnasium as gym
import minari
import numpy as np
import pytest
from helpers import run_algorithm, snapshot  # noqa: E402
from minari.data_collector import EpisodeBuffer

from common import data as data_mod
from common.logging import cli, tier_of

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "algorithms"))
import iql  # noqa: E402

TINY = ["--hidden-dims", "32", "32", "--batch-size", "32", "--eval-episodes", "2", "--no-log"]


def run_iql(*flags, cwd):
    return run_algorithm("iql", *flags, cwd=cwd)


def cli_error(monkeypatch, capsys, argv) -> str:
    """Run iql's command line in-process on `argv`: it must exit non-zero with one stderr line."""
    monkeypatch.setattr(sys, "argv", ["algorithms/iql.py", *argv])
    with pytest.raises(SystemExit) as exit_info:
        cli(iql.Args, iql.train)
    assert exit_info.value.code not in (0, None)
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("error: ") and "Traceback" not in err, err
    return err


def only_run_dirs(root: Path) -> list[Path]:
    return sorted(p for p in root.glob("*/*") if p.is_dir())


# --- bad input: one line, non-zero exit, no folder ---------------------------------------------
@pytest.mark.parametrize(
    "flags, expected",
    [
        (["--num-seeds", "0"], "--num-seeds must be at least 1"),
        (["--total-steps", "-5"], "--total-steps must be 0 or more"),
        (["--batch-size", "0"], "--batch-size must be at least 1"),
        (["--eval-episodes", "0"], "--eval-episodes must be at least 1"),
        (["--eval-every", "0"], "--eval-every must be at least 1"),
        (["--hidden-dims"], "--hidden-dims needs at least one layer size"),
        (["--hidden-dims", "64", "0"], "--hidden-dims sizes must be positive"),
        (["--total-steps", "0"], "nothing to train"),
        (["--dataset", "local/hopper/medium"], "invalid dataset id"),
        (["--dataset", "mujoco/nosuchrobot/medium-v0"], "could not be downloaded"),
    ],
)
def test_bad_flags_one_line_no_folder(flags, expected, tmp_path, monkeypatch, capsys):
    t0 = time.time()
    err = cli_error(monkeypatch, capsys, [*flags, "--out-dir", str(tmp_path / "runs")])
    assert expected in err
    assert time.time() - t0 < 10  # refused before anything is built or trained
    assert not (tmp_path / "runs").exists()


def test_unwritable_out_dir_and_datasets_path(pendulum_dataset, tmp_path, monkeypatch, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    err = cli_error(monkeypatch, capsys, ["--dataset", pendulum_dataset, "--out-dir", str(blocker / "runs")])
    assert "--out-dir" in err and "is a file" in err
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(blocker / "minari"))
    err = cli_error(monkeypatch, capsys, ["--dataset", "local/hopper/medium-v0", "--out-dir", str(tmp_path)])
    assert "cannot build local/hopper/medium-v0" in err and "MINARI_DATASETS_PATH" in err
    assert only_run_dirs(tmp_path) == []


def write_episodes(dataset_id, rewards_per_episode, nan_at=None):
    env = gym.make("Pendulum-v1")
    buffers = []
    for i, rewards in enumerate(rewards_per_episode):
        T = len(rewards)
        rewards = np.asarray(rewards, np.float64)
        if nan_at is not None and i == 0:
            rewards[nan_at] = np.nan
        buffers.append(EpisodeBuffer(
            id=i, observations=np.random.default_rng(i).normal(size=(T + 1, 3)),
            actions=np.zeros((T, 1), np.float32), rewards=rewards, terminations=np.zeros(T, bool),
            truncations=np.eye(T, dtype=bool)[-1],
        ))  # fmt: skip
    minari.create_dataset_from_buffers(
        dataset_id, buffers, env=env, algorithm_name="x", code_permalink="x", author="x",
        author_email="-", ref_min_score=0.0, ref_max_score=1.0, data_format="hdf5",
    )  # fmt: skip


def test_bad_data_named_with_its_path(tmp_path, monkeypatch, capsys):
    write_episodes("test/bad/nan-v0", [[1.0, 2.0, 3.0], [1.0, 1.0]], nan_at=1)
    err = cli_error(monkeypatch, capsys, ["--dataset", "test/bad/nan-v0", "--out-dir", str(tmp_path)])
    assert "non-finite values in rewards" in err and "main_data.hdf5" in err
    write_episodes("test/bad/cut-v0", [[1.0] * 50, [2.0] * 50])
    hdf5 = data_mod.dataset_dir("test/bad/cut-v0") / "data" / "main_data.hdf5"
    hdf5.write_bytes(hdf5.read_bytes()[: hdf5.stat().st_size // 2])  # a truncated download
    err = cli_error(monkeypatch, capsys, ["--dataset", "test/bad/cut-v0", "--out-dir", str(tmp_path)])
    assert "cannot read" in err and str(hdf5) in err
    assert only_run_dirs(tmp_path) == []


def test_zero_episodes_and_mismatched_columns_are_refused():
    class Empty:
        def iterate_episodes(self):
            return iter(())

    flat = data_mod._flatten_episodes(Empty())
    with pytest.raises(data_mod.UserError, match="no transitions"):
        data_mod.check_flat("test/empty-v0", flat, Path("/data/main_data.hdf5"))
    flat = {k: np.zeros(3) for k in data_mod.Dataset._fields}
    flat["actions"] = np.zeros(2)
    with pytest.raises(data_mod.UserError, match="columns of different lengths"):
        data_mod.check_flat("test/cols-v0", flat, Path("/data/main_data.hdf5"))


def test_tier_needs_every_phase_at_its_paper_budget():
    assert tier_of(1_000_000, 0, (1_000_000, 0)) == "paper"
    assert tier_of(1_000_000, 0, (1_000_000, 1_000_000)) == "short"  # Cal-QL offline only: not paper
    assert tier_of(1_000_001, 0, (1_000_000, 1_000_000)) == "short"  # a tuple comparison called it paper
    assert tier_of(999_999, 5_000_000, (1_000_000, 1_000_000)) == "short"
    assert tier_of(1_000_000, 1_000_000, (1_000_000, 1_000_000)) == "paper"


# --- --resume --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def finished_run(pendulum_dataset, tmp_path_factory):
    """A finished tiny IQL run made with non-default flags (dataset, sizes, seeds)."""
    out = tmp_path_factory.mktemp("resume")
    proc = run_iql("--dataset", pendulum_dataset, "--total-steps", "200", "--eval-every", "100", "--num-seeds", "2",
                   *TINY, "--out-dir", str(out), cwd=out)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    (run_dir,) = only_run_dirs(out)
    return run_dir


def test_resume_refuses_other_flags_before_loading(finished_run, tmp_path):
    before = snapshot(finished_run)
    refused = [(["--hidden-dims", "64", "64"], "--hidden-dims"), (["--dataset", "test/other/x-v0"], "--dataset"),
               (["--num-seeds", "3"], "--num-seeds"), (["--total-steps", "100"], "--total-steps")]  # fmt: skip
    for flags, name in refused:
        t0 = time.time()
        proc = run_iql("--resume", str(finished_run), *flags, cwd=tmp_path)
        assert proc.returncode == 1 and name in proc.stderr and "Traceback" not in proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1 and time.time() - t0 < 30
    proc = run_iql("--resume", str(tmp_path), cwd=tmp_path)  # not a run directory: refused at once
    assert proc.returncode == 1 and "not a run directory" in proc.stderr
    assert snapshot(finished_run) == before


def test_finished_run_resumed_changes_nothing(finished_run, tmp_path):
    before = snapshot(finished_run)
    proc = run_iql("--resume", str(finished_run), cwd=tmp_path)
    assert proc.returncode == 0 and "finished" in proc.stdout, proc.stderr[-2000:]
    assert snapshot(finished_run) == before


def test_resume_alone_continues_from_the_runs_config(finished_run, tmp_path):
    run_dir = tmp_path / "copy"
    run_dir.mkdir()
    for name, data in snapshot(finished_run).items():
        (run_dir / name).write_bytes(data)
    proc = run_iql("--resume", str(run_dir), "--total-steps", "300", cwd=tmp_path)  # no --dataset, no sizes
    assert proc.returncode == 0, proc.stderr[-2000:]
    record = json.loads((run_dir / "record.json").read_text())
    config = json.loads((run_dir / "config.json").read_text())
    assert record["dataset"] == config["dataset"] == "test/pendulum/pd-v0" and config["hidden_dims"] == [32, 32]
    assert [e["step"] for e in record["evaluations"]] == [100, 200, 300] and record["total_steps"] == 300
    assert np.asarray(record["evaluations"][-1]["returns"]).shape == (2, 2) and record["finished"]
    # Offline only: the actor's cosine schedule now spans 300 updates, and the run says so.
    (note,) = record["notes"]
    assert note.startswith("--total-steps 300 on a run started with 200") and f"note: {note}" in proc.stdout


def test_a_budget_that_changes_the_actor_schedule_is_noted():
    """Hand-computed cosine values at update 100 of a run started offline-only with 200 updates."""
    args = iql.Args(actor_lr=4e-4, total_steps=200)
    started = {"total_steps": 200, "online_steps": 0}
    assert iql.schedule_change(started, args, 100) is None  # resumed with the same budget
    longer = iql.schedule_change(started, dataclasses.replace(args, total_steps=300), 100)
    assert "from 0.0002 to 0.0003" in longer  # 4e-4 (1 + cos(pi/2)) / 2, then 4e-4 (1 + cos(pi/3)) / 2
    online = iql.schedule_change(started, dataclasses.replace(args, online_steps=50), 100)
    assert "(now 0.0002)" in online and "constant at 0.0004" in online
    # A run with an online phase has kept the rate constant from its start: nothing changes.
    assert (
        iql.schedule_change({"total_steps": 200, "online_steps": 10}, dataclasses.replace(args, online_steps=50), 100)
        is None
    )


def test_garbage_checkpoint_and_config_refused(finished_run, tmp_path):
    for name, garbage in [("checkpoint.msgpack", b"\x93\x01"), ("config.json", b"{not json")]:
        run_dir = tmp_path / name
        run_dir.mkdir()
        for other, data in snapshot(finished_run).items():
            (run_dir / other).write_bytes(data)
        (run_dir / name).write_bytes(garbage)
        proc = run_iql("--resume", str(run_dir), "--total-steps", "300", cwd=tmp_path)
        assert proc.returncode == 1 and name in proc.stderr and "Traceback" not in proc.stderr, proc.stderr


# --- SIGKILL in the online phase -------------------------------------------------------------
ONLINE = ["--total-steps", "200", "--online-steps", "1200", "--eval-every", "100", *TINY]


def test_killed_online_phase_resumes_to_the_uninterrupted_run(pendulum_dataset, tmp_path):
    ref_out, kill_out = tmp_path / "ref", tmp_path / "kill"
    proc = run_iql("--dataset", pendulum_dataset, *ONLINE, "--out-dir", str(ref_out), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (ref_dir,) = only_run_dirs(ref_out)
    reference = json.loads((ref_dir / "record.json").read_text())

    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, str(REPO / "algorithms" / "iql.py"), "--dataset", pendulum_dataset, *ONLINE]
    victim = subprocess.Popen([*cmd, "--out-dir", str(kill_out)], cwd=tmp_path, env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    deadline = time.time() + 240
    while time.time() < deadline and victim.poll() is None:
        records = list(kill_out.glob("iql/*/record.json"))
        if records:
            try:
                online = [e for e in json.loads(records[0].read_text())["evaluations"] if e["phase"] == "online"]
            except ValueError:
                online = []
            if online:
                os.kill(victim.pid, signal.SIGKILL)
                break
        time.sleep(0.02)
    victim.wait()
    assert victim.returncode == -signal.SIGKILL, "the run ended before it could be killed in its online phase"
    (run_dir,) = only_run_dirs(kill_out)
    killed_at = json.loads((run_dir / "record.json").read_text())["evaluations"][-1]["step"]
    assert killed_at < 1200
    proc = run_iql("--resume", str(run_dir), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    resumed = json.loads((run_dir / "record.json").read_text())
    strip = lambda r: [(e["step"], e["phase"], e["returns"]) for e in r["evaluations"]]  # noqa: E731
    assert strip(resumed) == strip(reference)
    assert resumed["final"] == reference["final"] and resumed["finished"]
