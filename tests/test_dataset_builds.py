"""datasets/: the same bytes on every machine, and builds that are safe to run side by side and to kill.

- A small build's fingerprint is committed here (FINGERPRINT_3000), and the same build in a
  subprocess with numpy's SIMD dispatch and OpenBLAS's kernel forced to other CPUs gives it too.
  The old float32 `@` / `np.tanh` / `np.exp` forward pass gave four different fingerprints for this
  build on one machine under the settings below (datasets/README.md). The committed value also
  depends on MuJoCo, Gymnasium and numpy's versions and on the C math library MuJoCo calls (glibc,
  FMA variants): after an upgrade of those, rebuild and update it.
- A build killed with SIGTERM (or SIGINT) removes its staging folder and stops its workers; two
  concurrent builds of one id both succeed; staging folders of dead builds are removed by the next
  build.
"""

import os
import platform
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from common.data import REPO_ROOT

MAKE = str(REPO_ROOT / "datasets" / "make.py")
SMALL_ID, SMALL_STEPS = "local/hopper/medium-v0", 3_000
# local/hopper/medium-v0 --num-steps 3000 --seed 0: 3,039 transitions in 5 episodes.
FINGERPRINT_3000 = (3039, 5, "daf672271b7d6f7ebe6cb681fb28e3182f111f78d6f625db62b21c33bd7f26c6")
# numpy's dispatch targets above its x86-64 baseline (numpy 2.x names; unknown names are ignored).
NO_AVX512 = "X86_V4 AVX512_ICL AVX512_SPR AVX512_SKX AVX512F"
NO_AVX2 = "X86_V3 " + NO_AVX512
FORCED = {
    "numpy without AVX512": {"NPY_DISABLE_CPU_FEATURES": NO_AVX512},
    "numpy baseline only": {"NPY_DISABLE_CPU_FEATURES": NO_AVX2},
    "OpenBLAS Haswell": {"OPENBLAS_CORETYPE": "Haswell"},
    "OpenBLAS Prescott": {"OPENBLAS_CORETYPE": "Prescott"},
}


def cpu_flags() -> set[str]:
    """The CPU's feature flags from /proc/cpuinfo (empty where there is none)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return set()
    return set(next((line.split(":", 1)[1].split() for line in lines if line.startswith("flags")), []))


# OpenBLAS's SkylakeX kernels are AVX-512: forced on a CPU without it they die of SIGILL (AMD EPYC
# machines here), so that setting is tried only where the CPU has AVX-512.
if "avx512f" in cpu_flags():
    FORCED["OpenBLAS SkylakeX"] = {"OPENBLAS_CORETYPE": "SkylakeX"}
x86_only = pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="x86-64 dispatch names")


def subprocess_env(root: Path, **extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("NPY_DISABLE_CPU_FEATURES", "OPENBLAS_CORETYPE")}
    env.update(MINARI_DATASETS_PATH=str(root), PYTHONPATH=str(REPO_ROOT), **extra)
    return env


def summary(dataset_id: str) -> tuple[int, int, str]:
    from common.data import load_dataset

    _, meta = load_dataset(dataset_id, to_device=False)
    return meta.size, len(meta.episode_lengths), meta.fingerprint


def hidden_entries(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.name.startswith(".")) if root.exists() else []


def dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


# --- the same bytes everywhere ------------------------------------------------------------------


def test_small_build_matches_the_committed_fingerprint(make_module, tmp_path, monkeypatch):
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path))
    make_module.build(SMALL_ID, num_steps=SMALL_STEPS, seed=0)
    assert summary(SMALL_ID) == FINGERPRINT_3000


def test_episodes_do_not_depend_on_how_they_are_chunked(make_module):
    """make.py sizes chunks by the build's step count: episode i is the same in any chunk."""
    from collect import run_chunk
    from policy import load_params, policy_path

    params = load_params(policy_path("hopper", "medium"))
    task = lambda idx: ("Hopper-v5", params, 0, 1, idx, True)  # noqa: E731
    together = run_chunk(task([0, 1, 2]))
    apart = run_chunk(task([0])) + run_chunk(task([1, 2]))
    assert [len(ep["rewards"]) for ep in together] == [len(ep["rewards"]) for ep in apart]
    for a, b in zip(together, apart):
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])
    assert [make_module.chunk_episodes(n) for n in (3_000, 10_000, 1_000_000)] == [1, 5, 16]


@x86_only
def test_small_build_is_the_same_with_cpu_dispatch_forced(tmp_path, monkeypatch):
    """numpy at its SSE4.2 baseline and OpenBLAS's Prescott kernel at once, in a real CLI build."""
    root = tmp_path / "forced"
    env = subprocess_env(root, NPY_DISABLE_CPU_FEATURES=NO_AVX2, OPENBLAS_CORETYPE="Prescott")
    out = subprocess.run(
        [sys.executable, MAKE, SMALL_ID, "--num-steps", str(SMALL_STEPS)], env=env, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr[-2000:]
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(root))
    assert summary(SMALL_ID) == FINGERPRINT_3000


ACT_PROBE = r"""
import hashlib, sys
import numpy as np
sys.path.insert(0, sys.argv[1])
import policy
rng = np.random.default_rng(0)
sizes = [(11, 256), (256, 256), (256, 3), (256, 3)]
params = {name: {"kernel": (rng.standard_normal(s) / np.sqrt(s[0])).astype(np.float32),
                 "bias": (0.1 * rng.standard_normal(s[1])).astype(np.float32)}
          for name, s in zip(["Dense_0", "Dense_1", "mean", "log_std"], sizes)}
obs = (3 * rng.standard_normal((600, 11))).astype(np.float32)
noise = rng.standard_normal((600, 3))
new, old = hashlib.sha256(), hashlib.sha256()
for lo, hi in [(0, 1), (1, 8), (8, 24), (24, 600)]:
    new.update(policy.act(params, obs[lo:hi], noise[lo:hi]).tobytes())
    new.update(policy.act(params, obs[lo:hi], None).tobytes())
    h = obs[lo:hi]  # the forward pass before the fix: float32 BLAS and numpy's tanh/exp
    for name in ["Dense_0", "Dense_1"]:
        h = np.maximum(h @ params[name]["kernel"] + params[name]["bias"], 0.0)
    mean = h @ params["mean"]["kernel"] + params["mean"]["bias"]
    log_std = -5.0 + 3.5 * (np.tanh(h @ params["log_std"]["kernel"] + params["log_std"]["bias"]) + 1.0)
    old.update(np.tanh(mean + np.exp(log_std) * noise[lo:hi].astype(np.float32)).tobytes())
print(new.hexdigest(), old.hexdigest())
"""


@x86_only
def test_actions_are_the_same_bits_under_every_forced_dispatch(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text(ACT_PROBE)
    results = {}
    for name, extra in {"default": {}, **FORCED}.items():
        out = subprocess.run(
            [sys.executable, str(probe), str(REPO_ROOT / "datasets")],
            env=subprocess_env(tmp_path, **extra),
            capture_output=True,
            text=True,
            check=True,
        )
        results[name] = out.stdout.split()
    assert len({new for new, _ in results.values()}) == 1, results
    # The probe has teeth: with numpy's bundled OpenBLAS the same settings change the old pass.
    blas = str(np.show_config(mode="dicts").get("Build Dependencies", {}).get("blas", {}).get("name", ""))
    if "openblas" in blas.lower():
        assert len({old for _, old in results.values()}) > 1, results


def test_fixed_math_agrees_with_numpy(make_module):  # loading datasets/make.py puts datasets/ on the path
    import policy

    rng = np.random.default_rng(1)
    x = np.concatenate([rng.standard_normal(20_000) * s for s in (1e-3, 0.3, 3, 30)] + [[0.0, 20.0, -20.0, 50.0]])
    ulp = lambda a, b: np.max(np.abs(a - b) / np.spacing(np.maximum(np.abs(b), 1e-300)))  # noqa: E731
    assert ulp(policy.fixed_exp(x), np.exp(x)) <= 2
    assert ulp(policy.fixed_expm1(x)[1], np.expm1(x)) <= 6
    assert ulp(policy.fixed_tanh(x), np.tanh(x)) <= 4
    assert policy.fixed_tanh(np.array([0.0, 25.0, -25.0])).tolist() == [0.0, 1.0, -1.0]
    for k in (1, 11, 256):
        a, w = rng.standard_normal((5, k)), rng.standard_normal((k, 7))
        np.testing.assert_allclose(policy.fixed_matmul(a, w), a @ w, rtol=1e-12, atol=1e-12)


def test_maze_goal_distance_and_reward_match_the_env_formula(make_module):
    import maze

    rng = np.random.default_rng(2)
    a, b = rng.uniform(-3, 3, (5000, 2)), rng.uniform(-3, 3, (5000, 2))
    d = np.linalg.norm(a - b, axis=-1)
    assert np.array_equal(maze.goal_distance(a, b), d)
    assert np.array_equal(maze.goal_reward(a, b, "sparse"), (d <= 0.45).astype(np.float64))
    np.testing.assert_allclose(maze.goal_reward(a, b, "dense"), np.exp(-d), rtol=4e-16)


# --- concurrent, interrupted and stale builds ---------------------------------------------------


def fake_write(root_of_staging_dataset: str, payload: str):
    """A `write` for atomic_build that makes a minimal dataset folder under the staging root."""

    def write():
        data = Path(os.environ["MINARI_DATASETS_PATH"]) / root_of_staging_dataset / "data"
        data.mkdir(parents=True)
        (data / "main_data.hdf5").write_text(payload)

    return write


def test_a_dataset_finished_meanwhile_is_kept_and_staging_dropped(make_module, tmp_path, monkeypatch):
    dataset_id = "local/hopper/random-v0"
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path))
    ours = fake_write(dataset_id, "ours")

    def theirs_finish_first():  # another process (ignoring the lock) publishes while we write
        ours()
        (tmp_path / dataset_id / "data").mkdir(parents=True)
        (tmp_path / dataset_id / "data" / "main_data.hdf5").write_text("theirs")

    make_module.atomic_build(dataset_id, False, theirs_finish_first)
    assert (tmp_path / dataset_id / "data" / "main_data.hdf5").read_text() == "theirs"
    assert hidden_entries(tmp_path) == []
    make_module.atomic_build(dataset_id, True, fake_write(dataset_id, "forced"))  # --force replaces it
    assert (tmp_path / dataset_id / "data" / "main_data.hdf5").read_text() == "forced"
    assert hidden_entries(tmp_path) == []


def test_stale_staging_of_dead_builds_is_removed(make_module, tmp_path, monkeypatch):
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path))
    host, dead, alive = make_module._host(), dead_pid(), os.getppid()
    stale = [f".staging-{host}-{dead}-1", f".trash-{host}-{dead}-2", f".staging-{dead}-3"]  # the last: old names
    kept = [f".staging-{host}-{alive}-4", f".staging-{socket.gethostname()}x-{dead}-5", ".other"]
    for name in stale + kept:
        (tmp_path / name / "local").mkdir(parents=True)
    make_module.atomic_build("local/hopper/random-v0", False, fake_write("local/hopper/random-v0", "x"))
    assert hidden_entries(tmp_path) == sorted(kept)


def children_of(pid: int) -> list[int]:
    kids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            kids.append(int(stat.parent.name))
    return kids


def running(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc")
@pytest.mark.parametrize("sig, status", [(signal.SIGTERM, 143), (signal.SIGINT, 130)], ids=["SIGTERM", "SIGINT"])
def test_a_killed_build_removes_staging_and_stops_the_workers(make_module, tmp_path, sig, status):
    root = tmp_path / "root"
    proc = subprocess.Popen(
        [sys.executable, MAKE, SMALL_ID, "--num-steps", "200000"],
        env=subprocess_env(root),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.time() + 120
        workers = []
        while time.time() < deadline and proc.poll() is None:
            # Collecting: a staging folder, and the pool's workers running (their command names spawn_main).
            kids = [k for k in children_of(proc.pid) if running(k)]
            workers = [k for k in kids if b"spawn_main" in Path(f"/proc/{k}/cmdline").read_bytes()]
            if len(workers) >= make_module.NUM_WORKERS and any(p.name.startswith(".staging-") for p in root.iterdir()):
                break
            time.sleep(0.2)
        assert len(workers) >= make_module.NUM_WORKERS, "the build never started collecting"
        time.sleep(1.0)  # well inside collection (200k steps take minutes)
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == status, err[-2000:]
    assert "Traceback" not in err, err[-2000:]
    assert hidden_entries(root) == []  # no staging folder, no lock file
    assert not (root / SMALL_ID).exists()
    # The build stopped its workers before exiting (a worker left to itself would finish its chunk
    # of 16 episodes first, seconds later).
    deadline = time.time() + 2
    while any(running(w) for w in workers) and time.time() < deadline:
        time.sleep(0.1)
    assert not [w for w in workers if running(w)]


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
def test_a_signal_in_a_deferred_section_is_raised_when_the_section_ends(make_module):
    """Moving the dataset in and starting the pool run whole: a signal waits for the section's end,
    even when another thread of the process takes it (a signal mask on the main thread did not)."""
    import threading

    stop = threading.Event()
    other = threading.Thread(target=stop.wait)  # a thread that could take the signal
    other.start()
    ran = []
    try:
        with pytest.raises(KeyboardInterrupt), make_module.interruptible():
            with make_module.signals_deferred():
                os.kill(os.getpid(), signal.SIGINT)
                for _ in range(50):  # Python runs the handler between these bytecodes
                    time.sleep(0.01)
                ran.append("whole section")
            ran.append("after the section")
    finally:
        stop.set()
        other.join()
    assert ran == ["whole section"]


def test_two_concurrent_builds_both_succeed(tmp_path, monkeypatch):
    root = tmp_path / "root"
    dataset_id = "local/hopper/random-v0"
    stale = root / f".staging-{socket.gethostname()}-{dead_pid()}-1"
    (stale / "local").mkdir(parents=True)
    cmd = [sys.executable, MAKE, dataset_id, "--num-steps", "300"]
    procs = [subprocess.Popen(cmd, env=subprocess_env(root), stdout=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    assert sum("already built" in out or "built meanwhile" in out for out in outs) == 1, outs
    assert hidden_entries(root) == []  # the stale folder too
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(root))
    import minari

    assert list(minari.list_local_datasets()) == [dataset_id]
    size, episodes, _ = summary(dataset_id)
    assert size >= 300 and episodes >= 1


# --- bad input: one line ------------------------------------------------------------------------


def test_unwritable_root_and_bad_id_are_one_line(make_module, tmp_path, monkeypatch, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(blocker / "minari"))
    assert make_module.main(["local/hopper/random-v0", "--num-steps", "100"]) == 1
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and str(blocker) in err and "MINARI_DATASETS_PATH" in err, err
    assert make_module.main(["local/hopper/nope-v0"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "local/hopper/medium-v0" in err, err
