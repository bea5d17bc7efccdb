"""Watching and loading a run (common/evaluation.py, common/logging.py), through iql.py:
`--capture-video` MP4s and tensorboard thumbnails, `--track` to an offline wandb run, and
`--eval-only RUN_DIR` (`load_policy` is tested on every algorithm file in its own test file)."""

import ctypes.util
import glob
import json
import struct
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import only_run_dir, run_algorithm, snapshot

from common import evaluation
from common.data import load_dataset
from common.logging import cli

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "algorithms"))
import iql  # noqa: E402

RENDERER = ctypes.util.find_library("EGL") or ctypes.util.find_library("OSMesa")
NO_RENDERER = "no EGL or OSMesa library on this machine: MuJoCo cannot render headless (.ci/run installs libegl1)"
FLAGS = ["--total-steps", "200", "--eval-every", "100", "--num-seeds", "2", "--hidden-dims", "32", "32",
         "--batch-size", "32", "--eval-episodes", "2"]  # fmt: skip
OFFLINE_WANDB = {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_PROJECT": "jaxorl-tests"}


@pytest.fixture(scope="module")
def watched_run(pendulum_dataset, tmp_path_factory):
    """A tiny IQL run with --capture-video and --track (wandb offline)."""
    out = tmp_path_factory.mktemp("watched")
    proc = run_algorithm("iql", "--dataset", pendulum_dataset, *FLAGS, "--capture-video", "--track",
                         "--out-dir", out, cwd=out, env=OFFLINE_WANDB)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_dir = only_run_dir(out, "iql")
    return proc, run_dir, json.loads((run_dir / "record.json").read_text())


def tensorboard_events(run_dir: Path) -> list:
    from tensorboard.backend.event_processing.event_file_loader import LegacyEventFileLoader

    (path,) = run_dir.glob("events.out.tfevents*")
    return list(LegacyEventFileLoader(str(path)).Load())  # as written: images stay images


def tensorboard_scalars(run_dir: Path) -> dict:
    """{(tag, step): value} of every scalar."""
    from tensorboard.util import tensor_util

    out = {}
    for event in tensorboard_events(run_dir):
        for v in event.summary.value:
            if v.HasField("tensor"):
                out[(v.tag, event.step)] = float(tensor_util.make_ndarray(v.tensor))
    return out


def wandb_records(run_dir: Path) -> tuple[list[dict], dict]:
    """The history rows and the config of an offline wandb run, read from its .wandb file (LevelDB-style log:
    a 7-byte header, 32 KiB blocks of records with a 7-byte header each; protobuf Records). Media
    (the videos) come as nested keys and are left out."""
    from wandb.proto import wandb_internal_pb2

    (path,) = glob.glob(str(run_dir / "wandb" / "offline-run-*" / "*.wandb"))
    raw, pos, part, rows, config = Path(path).read_bytes(), 7, b"", [], {}
    assert raw[:4] == b":W&B"
    while pos + 7 <= len(raw):
        left = 32768 - pos % 32768
        _, n, kind = struct.unpack("<IHB", raw[pos : pos + 7])
        if left < 7 or (n == 0 and kind == 0):  # block trailer or padding
            pos += left
            continue
        part, pos = part + raw[pos + 7 : pos + 7 + n], pos + 7 + n
        if kind in (1, 4):  # a full record, or the last piece of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(part)
            part = b""
            if record.WhichOneof("record_type") == "history":
                items = [(item.key or "/".join(item.nested_key), item) for item in record.history.item]
                rows.append({key: json.loads(item.value_json) for key, item in items if len(item.nested_key) < 2})
            elif record.WhichOneof("record_type") in ("run", "config"):  # the config starts with the run
                updates = record.run.config.update if record.HasField("run") else record.config.update
                config.update({item.key: json.loads(item.value_json) for item in updates})
    return rows, config


@pytest.mark.skipif(not RENDERER, reason=NO_RENDERER)
def test_each_evaluation_writes_a_video_of_the_first_episode(watched_run):
    import av

    proc, run_dir, record = watched_run
    assert "no video" not in proc.stderr
    for entry in record["evaluations"]:
        path = run_dir / "videos" / f"step_{entry['step']}.mp4"
        with av.open(str(path)) as container:
            frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
        assert len(frames) == entry["lengths"][0][0] + 1  # the reset frame, then one per step
        assert frames[0].shape == (evaluation.VIDEO_SIZE, evaluation.VIDEO_SIZE, 3) and frames[0].std() > 1
    images = [(e.step, v.image) for e in tensorboard_events(run_dir) for v in e.summary.value if v.tag == "eval/video"]
    assert [step for step, _ in images] == [e["step"] for e in record["evaluations"]]
    assert all(image.encoded_image_string[:6] == b"GIF89a" for _, image in images)
    assert not list(run_dir.glob("videos/.*"))  # no temporary file left


def test_offline_wandb_run_holds_the_tensorboard_scalars_and_videos(watched_run):
    _, run_dir, record = watched_run
    tb = tensorboard_scalars(run_dir)
    rows, config = wandb_records(run_dir)
    run_config = json.loads((run_dir / "config.json").read_text())
    assert config["expectile"] == run_config["expectile"] == 0.7 and config["num_seeds"] == 2
    assert "out_dir" not in config  # no path of this machine
    logged = {(k, row["global_step"]): v for row in rows if "global_step" in row for k, v in row.items()
              if not k.startswith(("_", "global"))}  # fmt: skip
    scalars = {k: v for k, v in logged.items() if isinstance(v, float | int)}
    assert len(tb) > 10 and set(tb) == set(scalars)
    for key, value in tb.items():
        assert scalars[key] == pytest.approx(value, rel=1e-6), key
    videos = glob.glob(str(run_dir / "wandb" / "offline-run-*" / "files" / "media" / "videos" / "**" / "*.mp4"),
                       recursive=True)  # fmt: skip
    assert len(videos) == (len(record["evaluations"]) if RENDERER else 0)


def test_eval_only_reproduces_the_last_evaluation_and_changes_nothing(watched_run, tmp_path):
    _, run_dir, record = watched_run
    before = snapshot(run_dir)
    proc = run_algorithm("iql", "--eval-only", run_dir, "--capture-video", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    last = record["evaluations"][-1]
    stem = f"step_{last['step']}__seed_0__2ep"
    entry = json.loads((run_dir / "eval_only" / f"{stem}.json").read_text())
    assert entry["returns"] == last["returns"] and entry["lengths"] == last["lengths"]  # a video changes no score
    assert f"the record's last evaluation: {record['final']['normalized_mean']:.1f}" in proc.stdout
    if RENDERER:
        assert (run_dir / "eval_only" / f"{stem}.mp4").stat().st_size > 0
    assert snapshot(run_dir) == before  # config, record, checkpoint and events untouched
    proc = run_algorithm("iql", "--eval-only", run_dir, "--eval-episodes", "3", "--seed", "5", cwd=tmp_path)
    entry = json.loads((run_dir / "eval_only" / f"step_{last['step']}__seed_5__3ep.json").read_text())
    assert proc.returncode == 0 and np.shape(entry["returns"]) == (2, 3)


def cli_error(monkeypatch, capsys, argv) -> str:
    monkeypatch.setattr(sys, "argv", ["algorithms/iql.py", *argv])
    with pytest.raises(SystemExit) as exit_info:
        cli(iql.Args, iql.train)
    assert exit_info.value.code == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("error: ") and "Traceback" not in err, err
    return err


def test_eval_only_and_track_bad_input_is_one_line(watched_run, tmp_path, monkeypatch, capsys):
    _, run_dir, _ = watched_run
    before = snapshot(run_dir)
    err = cli_error(monkeypatch, capsys, ["--eval-only", str(run_dir), "--hidden-dims", "64", "64"])
    assert "--hidden-dims" in err and "--eval-only takes the run's config" in err
    assert "not a run directory" in cli_error(monkeypatch, capsys, ["--eval-only", str(tmp_path)])
    assert "give one of them" in cli_error(monkeypatch, capsys, ["--eval-only", str(run_dir), "--resume", str(run_dir)])
    monkeypatch.setitem(sys.modules, "wandb", None)  # as if the track extra were not installed
    err = cli_error(monkeypatch, capsys, ["--track", "--out-dir", str(tmp_path / "runs")])
    assert "pip install -e '.[track]'" in err and not (tmp_path / "runs").exists()
    assert snapshot(run_dir) == before


def test_a_failing_renderer_is_said_once_and_the_evaluation_goes_on(pendulum_dataset, tmp_path, monkeypatch, capsys):
    import gymnasium as gym
    import jax.numpy as jnp

    class NoRender(gym.Wrapper):
        def render(self):
            raise RuntimeError("no OpenGL context")

    _, meta = load_dataset(pendulum_dataset, to_device=False)
    make_env = meta.make_env
    monkeypatch.setattr(meta, "make_env", lambda **kw: NoRender(make_env()) if kw else make_env())
    monkeypatch.setattr(evaluation, "_video_off", None)
    policy = lambda params, carry, obs, prev_reward, rng: (jnp.zeros(obs.shape[:2] + (1,)), carry)  # noqa: E731
    params = jnp.zeros((2, 1))
    plain = evaluation.evaluate(meta, policy, params, num_episodes=2, seed=0)
    for _ in range(2):
        result = evaluation.evaluate(meta, policy, params, num_episodes=2, seed=0, video=tmp_path / "v.mp4")
        assert result.video is None and np.array_equal(result.returns, plain.returns)
    err = capsys.readouterr().err
    assert err.count("warning: no video (RuntimeError: no OpenGL context") == 1 and "continues without video" in err
    assert list(tmp_path.iterdir()) == []  # no video, no temporary file
