"""Build the local D4RL-style Minari datasets, with no network.

    python datasets/make.py local/hopper/medium-v0 [--num-steps N] [--seed S] [--force]
    python datasets/make.py --all
    python datasets/make.py --list

Locomotion ids `local/<robot>/<level>-v0` (robot: halfcheetah, hopper, walker2d; level: random,
medium, medium-replay, expert, medium-expert) follow D4RL's recipe with the SAC policies shipped
in `datasets/policies/`: random = the actor at initialization, medium = the first snapshot at about
a third of the expert's return, expert = the end of training, all collected with the policy's
stochastic actions; medium-replay = episodes from every snapshot up to medium, in training order;
medium-expert = medium + expert. Maze ids `local/pointmaze/<maze>-<variant>-v0` are built by
`maze.py` (a grid planner and PD controller, no learned policy).

A dataset is whole episodes: collection takes episodes in index order until the requested number
of transitions is reached (the last one is finished). It is written under a hidden staging folder
of `$MINARI_DATASETS_PATH` and moved into place only when complete, so an interrupted build
leaves nothing that Minari lists or loads.

Builds are safe to run side by side and to kill:
- One build per dataset id at a time: a lock file (`.lock-<id>` in `$MINARI_DATASETS_PATH`, held
  with `flock` and removed at the end) makes a second build of the same id wait; it then finds the
  dataset built and skips it (or, with --force, rebuilds it after the first). Publishing never
  fails on a dataset that appeared meanwhile: without --force the later build keeps the existing
  one and discards its own staging folder.
- SIGTERM and SIGINT during a build raise in the main process (SystemExit(143) / KeyboardInterrupt),
  so the collection workers are terminated and the staging folder removed before it exits (exit
  status 143 / 130); a second signal kills it at once. The workers ignore SIGINT (a Ctrl-C reaches
  the whole process group) and exit on their own if the build process disappears (SIGKILL).
- Staging (`.staging-<host>-<pid>-<ns>`) and trash (`.trash-...`) folders left by a build that was
  killed outright are removed by the next build on the same host once their pid is no longer alive.
- The same id, seed and size give the same bytes on every machine as far as our code goes: the
  policy's forward pass uses fixed-order arithmetic (see policy.py); MuJoCo's use of the C math
  library is the dependence that remains.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import multiprocessing as mp
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

from policy import REF_SCORES, ROBOTS, load_params, policy_path, replay_paths, silence_mujoco  # noqa: E402

LEVELS = ("random", "medium", "medium-replay", "expert", "medium-expert")
MAZES = ("open", "umaze", "medium", "large")
MAZE_VARIANTS = ("sparse", "dense")
DEFAULT_STEPS = {"random": 1_000_000, "medium": 1_000_000, "expert": 1_000_000}
# D4RL's medium-replay sizes (transitions) per robot.
REPLAY_STEPS = {"halfcheetah": 202_000, "hopper": 402_000, "walker2d": 302_000}
NUM_WORKERS = 2  # fixed, not os.cpu_count(): the chunking must not depend on the machine
MAX_CHUNK_EPISODES = 16  # episodes run side by side in one worker call, at most
LEVEL_STREAM = {"random": 0, "medium": 1, "expert": 2}  # seeds differ per level; replay uses 100 + k


def locomotion_ids() -> list[str]:
    return [f"local/{r}/{lvl}-v0" for r in ROBOTS for lvl in LEVELS]


def maze_ids() -> list[str]:
    return [f"local/pointmaze/{m}-{v}-v0" for m in MAZES for v in MAZE_VARIANTS]


def all_ids() -> list[str]:
    return locomotion_ids() + maze_ids()


def parse_id(dataset_id: str) -> tuple[str, str, str]:
    """('locomotion', robot, level) or ('pointmaze', maze, variant); a ValueError listing the ids."""
    m = re.fullmatch(r"local/([a-z0-9]+)/([a-z\-]+)-v0", dataset_id)
    if m and m.group(1) in ROBOTS and m.group(2) in LEVELS:
        return "locomotion", m.group(1), m.group(2)
    m = re.fullmatch(r"local/pointmaze/([a-z]+)-([a-z]+)-v0", dataset_id)
    if m and m.group(1) in MAZES and m.group(2) in MAZE_VARIANTS:
        return "pointmaze", m.group(1), m.group(2)
    raise ValueError(f"unknown local dataset id {dataset_id!r}; valid ids: " + ", ".join(all_ids()))


def datasets_root() -> Path:
    return Path(os.environ.get("MINARI_DATASETS_PATH", Path.home() / ".minari" / "datasets"))


def is_built(dataset_id: str) -> bool:
    return (datasets_root() / dataset_id / "data" / "main_data.hdf5").exists()


def code_version() -> str:
    try:
        out = subprocess.run(
            ["git", "describe", "--always", "--dirty"], cwd=HERE, capture_output=True, text=True, timeout=5
        )
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


# --- collection -------------------------------------------------------------------------------


def chunk_episodes(num_steps: int) -> int:
    """Episodes per worker call: up to 16 side by side (one batched policy call per step), fewer for
    a small build, which would otherwise wait for 16 full-length episodes per worker to collect a
    few thousand steps. Episodes do not depend on how they are chunked (see collect.py)."""
    return int(np.clip(num_steps // (1000 * NUM_WORKERS), 1, MAX_CHUNK_EPISODES))


def collect(pool, env_id: str, policy: str, num_steps: int, seed: int, stream: int, pbar=None) -> list[dict]:
    """Episodes of one policy, in index order, until they hold at least `num_steps` transitions.
    `policy` names one of the policies the pool's workers were given (see `level_policies`): a task
    is a few hundred bytes, never the weights, so the pool's task pipe never fills."""
    from collect import run_chunk

    episodes, total, next_chunk, pending = [], 0, 0, []
    size = chunk_episodes(num_steps)
    while total < num_steps:
        while len(pending) < 2 * NUM_WORKERS:
            idx = list(range(next_chunk * size, (next_chunk + 1) * size))
            pending.append(pool.apply_async(run_chunk, ((env_id, policy, seed, stream, idx, True),)))
            next_chunk += 1
        for ep in pending.pop(0).get():
            if total >= num_steps:
                break
            episodes.append(ep)
            total += len(ep["rewards"])
            if pbar is not None:
                pbar.update(len(ep["rewards"]))
    # Chunks still pending are not waited for: their episodes are not needed. The next policy's
    # chunks queue behind them; when the last policy is done, the build's stop event empties the queue.
    return episodes


def level_policies(robot: str, level: str) -> dict[str, Path]:
    """The shipped policy files a level collects with, by the name tasks use for them."""
    if level == "medium-expert":
        return {**level_policies(robot, "medium"), **level_policies(robot, "expert")}
    if level == "medium-replay":
        return {f"replay-{k}": path for k, path in enumerate(replay_paths(robot))}
    return {level: policy_path(robot, level)}


def collect_level(pool, robot: str, level: str, num_steps: int, seed: int, pbar=None) -> list[dict]:
    env_id = ROBOTS[robot]
    if level == "medium-expert":
        half = num_steps // 2
        medium = collect_level(pool, robot, "medium", half, seed, pbar)
        return medium + collect_level(pool, robot, "expert", num_steps - half, seed, pbar)
    if level == "medium-replay":
        paths = replay_paths(robot)
        per = int(np.ceil(num_steps / len(paths)))
        episodes = []
        for k in range(len(paths)):
            episodes += collect(pool, env_id, f"replay-{k}", per, seed, 100 + k, pbar)
        return episodes
    return collect(pool, env_id, level, num_steps, seed, LEVEL_STREAM[level], pbar)


def default_steps(robot: str, level: str) -> int:
    if level == "medium-replay":
        return REPLAY_STEPS[robot]
    if level == "medium-expert":
        return 2 * DEFAULT_STEPS["medium"]
    return DEFAULT_STEPS[level]


def write_locomotion(dataset_id: str, robot: str, level: str, num_steps: int, seed: int) -> None:
    import minari
    from collect import worker_init
    from minari.data_collector import EpisodeBuffer
    from tqdm.auto import tqdm

    silence_mujoco()
    t0 = time.time()
    ctx = mp.get_context("spawn")  # never fork a process that may hold JAX's threads
    # Every policy of the level goes to each worker once, at its start (spawn's start-up pipe).
    policies = {name: load_params(path) for name, path in level_policies(robot, level).items()}
    stop = ctx.Event()
    pool = None
    try:
        # A signal waits until the pool has started: Pool() stops the workers it started after an
        # Exception only, and one left starting would fail once this process is gone (a traceback).
        with signals_deferred():
            pool = ctx.Pool(NUM_WORKERS, initializer=worker_init, initargs=(os.getpid(), policies, stop))
        with tqdm(total=num_steps, desc=f"collecting {dataset_id}", unit="step", mininterval=2.0) as pbar:
            episodes = collect_level(pool, robot, level, num_steps, seed, pbar)
            # Done: queued chunks return at once, running ones finish, and the workers exit on their
            # own. Only an error or a signal leaves the pool to the terminate below.
            stop.set()
            pool.close()
            pool.join()
    finally:
        if pool is not None:
            pool.terminate()
    buffers = [
        EpisodeBuffer(
            id=i,
            observations=ep["observations"],
            actions=ep["actions"],
            rewards=ep["rewards"],
            terminations=ep["terminations"],
            truncations=ep["truncations"],
        )
        for i, ep in enumerate(episodes)
    ]
    steps = sum(len(ep["rewards"]) for ep in episodes)
    returns = [float(ep["rewards"].sum()) for ep in episodes]
    ref_min, ref_max = REF_SCORES[robot]
    description = (
        f"jaxorl local D4RL-style dataset: {level} level of {ROBOTS[robot]}, {steps} transitions in "
        f"{len(episodes)} episodes (mean return {np.mean(returns):.1f}), collected with the stochastic actions of "
        f"the SAC policies shipped in jaxorl's datasets/policies (manifest.json), seed {seed}. "
        f"Built by `python datasets/make.py {dataset_id}` at code version {code_version()}. "
        "ref_min_score/ref_max_score are D4RL's reference returns for this robot."
    )
    print(f"writing {len(episodes)} episodes ({steps} steps, collected in {time.time() - t0:.1f} s)", flush=True)
    minari.create_dataset_from_buffers(
        dataset_id=dataset_id,
        buffer=buffers,
        env=ROBOTS[robot],
        eval_env=ROBOTS[robot],
        algorithm_name=f"SAC ({level})",
        code_permalink=f"jaxorl datasets/make.py @ {code_version()}",
        author="jaxorl",
        author_email="jaxorl@users.noreply.github.com",
        ref_min_score=ref_min,
        ref_max_score=ref_max,
        description=description,
        data_format="hdf5",
    )


# --- atomic, concurrent and interruptible builds --------------------------------------------------

STAGING_RE = re.compile(r"\.(?:staging|trash)-(?:(?P<host>.+)-)?(?P<pid>\d+)-(?P<ns>\d+)")


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9_.]", "_", socket.gethostname()) or "host"


def _temp_name(kind: str) -> str:
    """`.staging-<host>-<pid>-<ns>` or `.trash-...`: hidden (Minari never lists it) and traceable."""
    return f".{kind}-{_host()}-{os.getpid()}-{time.time_ns()}"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's live process
    try:  # a zombie is dead for our purposes (its parent has not reaped it yet)
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def remove_stale(root: Path) -> list[Path]:
    """Remove staging and trash folders of builds on this host whose process is gone."""
    removed = []
    if not root.is_dir():
        return removed
    for path in root.iterdir():
        m = STAGING_RE.fullmatch(path.name)
        if not m or (m.group("host") not in (None, _host())):
            continue  # not ours to judge: another host's build may still be running
        pid = int(m.group("pid"))
        if pid == os.getpid() or _pid_alive(pid):
            continue
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
        print(f"removed {path.name}, left by a build (pid {pid}) that no longer runs", flush=True)
    return removed


@contextlib.contextmanager
def build_lock(root: Path, dataset_id: str) -> Iterator[None]:
    """Hold an exclusive `flock` on `<root>/.lock-<id>` for one build of `dataset_id`; removed when
    done. A process that finds it held waits (and says so). After locking, the file is checked to
    still be the one at the path, since a holder deletes it on its way out."""
    import fcntl

    path = root / f".lock-{dataset_id.replace('/', '--')}"
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "?"
                print(f"another build of {dataset_id} (pid {holder}) is running: waiting for it", flush=True)
                fcntl.flock(fd, fcntl.LOCK_EX)
            st = os.fstat(fd)
            try:
                current = os.stat(path)
            except FileNotFoundError:
                current = None
            if current is not None and (current.st_dev, current.st_ino) == (st.st_dev, st.st_ino):
                break
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)  # the previous holder removed this file: lock the new one
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)  # still holding the lock, so no one has locked this file meanwhile
        os.close(fd)


class BuildInterrupted(SystemExit):
    """SIGTERM during a build (exit status 128 + 15)."""


# Under `interruptible`, inside `signals_deferred`: the signal that came, raised when the section ends.
_DEFERRAL = {"depth": 0, "pending": None}


def interrupt(signum: int) -> BaseException:
    """What a signal raises in a build: BuildInterrupted (exit 143) for SIGTERM, else KeyboardInterrupt."""
    return BuildInterrupted(128 + signal.SIGTERM) if signum == signal.SIGTERM else KeyboardInterrupt()


@contextlib.contextmanager
def interruptible() -> Iterator[None]:
    """For the build's duration, SIGTERM raises BuildInterrupted and SIGINT KeyboardInterrupt in
    the main thread (at the end of a `signals_deferred` section when inside one), so the pool's
    workers are terminated and the staging folder removed on the way out. A second signal takes the
    default action (the process dies at once; the next build removes what it left). Previous
    handlers come back afterwards. Outside the main thread: nothing changes."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    fired = []

    def handler(signum, frame):
        if fired:  # asked twice: stop now
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        fired.append(signum)
        if _DEFERRAL["depth"]:
            _DEFERRAL["pending"] = signum
            return
        raise interrupt(signum)

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        _DEFERRAL["pending"] = None
        for sig, old in previous.items():
            signal.signal(sig, old)


@contextlib.contextmanager
def signals_deferred() -> Iterator[None]:
    """SIGTERM and SIGINT wait until the section has run (moving the finished dataset in, starting
    the pool). A handler's flag, not a signal mask: the process's other threads (BLAS, the pool's)
    would take a signal the main thread blocks, and Python runs its handler in the main thread
    all the same."""
    _DEFERRAL["depth"] += 1
    try:
        yield
    finally:
        _DEFERRAL["depth"] -= 1
    if not _DEFERRAL["depth"] and _DEFERRAL["pending"] is not None:
        signum, _DEFERRAL["pending"] = _DEFERRAL["pending"], None
        raise interrupt(signum)


def _publish(root: Path, staging: Path, dataset_id: str, force: bool) -> Path:
    """Move `staging/<id>` to `root/<id>`. If a finished dataset is there: without `force` keep it
    (another build finished first) and drop ours; with `force` replace it."""
    final = root / dataset_id
    # Namespace metadata Minari wrote in staging (local/, local/<robot>/) goes along if missing.
    for ns_file in staging.rglob("namespace_metadata.json"):
        target = root / ns_file.relative_to(staging)
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
            shutil.copy(ns_file, tmp)
            os.replace(tmp, target)  # atomic: a concurrent reader never sees half a file
    final.parent.mkdir(parents=True, exist_ok=True)
    if is_built(dataset_id) and not force:
        print(f"{dataset_id} was built meanwhile by another process: keeping that one", flush=True)
        return final
    trash = None
    if final.exists():  # a forced rebuild, or a half-made folder: move it out of the way first
        trash = root / _temp_name("trash")
        os.replace(final, trash)
    try:
        os.replace(staging / dataset_id, final)
    except OSError as e:
        if e.errno not in (errno.ENOTEMPTY, errno.EEXIST) or not is_built(dataset_id):
            raise
        print(f"{dataset_id} was built meanwhile by another process: keeping that one", flush=True)
    if trash is not None:
        shutil.rmtree(trash, ignore_errors=True)
    return final


def atomic_build(dataset_id: str, force: bool, write: Callable[[], None]) -> Path:
    """Run `write()` (which creates `dataset_id` through Minari) against a hidden staging root,
    then move the finished dataset into `$MINARI_DATASETS_PATH`; one build per id at a time (a lock),
    stale staging folders of killed builds removed first, SIGTERM/SIGINT turned into a cleanup."""
    root = datasets_root()
    final = root / dataset_id
    if is_built(dataset_id) and not force:
        print(f"{dataset_id} is already built at {final} (use --force to rebuild)", flush=True)
        return final
    root.mkdir(parents=True, exist_ok=True)  # an unwritable root fails here, before any work
    with interruptible():
        remove_stale(root)
        with build_lock(root, dataset_id):
            if is_built(dataset_id) and not force:  # another build finished while we waited
                print(f"{dataset_id} is already built at {final} (use --force to rebuild)", flush=True)
                return final
            staging = root / _temp_name("staging")
            previous = os.environ.get("MINARI_DATASETS_PATH")
            try:
                staging.mkdir()
                os.environ["MINARI_DATASETS_PATH"] = str(staging)
                try:
                    write()
                finally:
                    if previous is None:
                        os.environ.pop("MINARI_DATASETS_PATH", None)
                    else:
                        os.environ["MINARI_DATASETS_PATH"] = previous
                with signals_deferred():
                    return _publish(root, staging, dataset_id, force)
            finally:
                with signals_deferred():
                    shutil.rmtree(staging, ignore_errors=True)


def build(dataset_id: str, *, num_steps: int | None = None, seed: int = 0, force: bool = False) -> Path:
    """Build one local dataset (skipped if already built, unless `force`). Returns its folder."""
    kind, a, b = parse_id(dataset_id)
    if num_steps is not None and num_steps <= 0:
        raise ValueError(f"--num-steps must be positive, got {num_steps}")
    t0 = time.time()
    # Everything that can be checked without collecting is checked before the lock and staging.
    if kind == "locomotion":
        steps = num_steps or default_steps(a, b)
        if b == "medium-replay":
            replay_paths(a)  # a clear error if not shipped
        else:
            policy_path(a, "medium" if b == "medium-expert" else b)
            if b == "medium-expert":
                policy_path(a, "expert")
        path = atomic_build(dataset_id, force, lambda: write_locomotion(dataset_id, a, b, steps, seed))
    else:
        import maze

        maze.check_num_steps(a, num_steps)
        maze.require_robotics()
        path = atomic_build(dataset_id, force, lambda: maze.write_maze(dataset_id, a, b, num_steps, seed))
    print(f"{dataset_id}: ready at {path} ({time.time() - t0:.1f} s)", flush=True)
    return path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("dataset_id", nargs="?", help="e.g. local/hopper/medium-v0")
    p.add_argument("--num-steps", type=int, default=None, help="transitions (default: D4RL's size)")
    p.add_argument("--seed", type=int, default=0, help="collection seed (default 0)")
    p.add_argument("--force", action="store_true", help="rebuild even if already built")
    p.add_argument("--all", action="store_true", help="build every local dataset")
    p.add_argument("--list", action="store_true", help="list every local id and whether it is built")
    args = p.parse_args(argv)
    if args.list:
        for dataset_id in all_ids():
            print(f"{dataset_id:40s} {'built' if is_built(dataset_id) else '-'}")
        return 0
    if args.all:
        ids = all_ids()
    elif args.dataset_id:
        ids = [args.dataset_id]
    else:
        p.error("give a dataset id, --all or --list")
    try:
        for dataset_id in ids:
            parse_id(dataset_id)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for dataset_id in ids:
        try:
            build(dataset_id, num_steps=args.num_steps, seed=args.seed, force=args.force)
        except (FileNotFoundError, ValueError, ImportError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
        except OSError as e:  # an unwritable MINARI_DATASETS_PATH, or a file in its way
            where = e.filename or datasets_root()
            print(
                f"error: cannot build {dataset_id} into {datasets_root()}: {e.strerror or e} ({where}); "
                "set MINARI_DATASETS_PATH to a folder you can write to",
                file=sys.stderr,
            )
            return 1
        except KeyboardInterrupt:
            print(f"interrupted: {dataset_id} was not built (nothing of it was left behind)", file=sys.stderr)
            return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
