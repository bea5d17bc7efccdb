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
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
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
CHUNK_EPISODES = 16  # episodes run side by side in one worker call
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
    raise ValueError(f"unknown local dataset id {dataset_id!r}; valid ids:\n  " + "\n  ".join(all_ids()))


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


def collect(pool, env_id: str, params: dict, num_steps: int, seed: int, stream: int, pbar=None) -> list[dict]:
    """Episodes of one policy, in index order, until they hold at least `num_steps` transitions."""
    from collect import run_chunk

    episodes, total, next_chunk, pending = [], 0, 0, []
    while total < num_steps:
        while len(pending) < 2 * NUM_WORKERS:
            idx = list(range(next_chunk * CHUNK_EPISODES, (next_chunk + 1) * CHUNK_EPISODES))
            pending.append(pool.apply_async(run_chunk, ((env_id, params, seed, stream, idx, True),)))
            next_chunk += 1
        for ep in pending.pop(0).get():
            if total >= num_steps:
                break
            episodes.append(ep)
            total += len(ep["rewards"])
            if pbar is not None:
                pbar.update(len(ep["rewards"]))
    for job in pending:
        job.wait()  # let the pool drain before the next policy's chunks
    return episodes


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
        for k, path in enumerate(paths):
            episodes += collect(pool, env_id, load_params(path), per, seed, 100 + k, pbar)
        return episodes
    params = load_params(policy_path(robot, level))
    return collect(pool, env_id, params, num_steps, seed, LEVEL_STREAM[level], pbar)


def default_steps(robot: str, level: str) -> int:
    if level == "medium-replay":
        return REPLAY_STEPS[robot]
    if level == "medium-expert":
        return 2 * DEFAULT_STEPS["medium"]
    return DEFAULT_STEPS[level]


def write_locomotion(dataset_id: str, robot: str, level: str, num_steps: int, seed: int) -> None:
    import minari
    from minari.data_collector import EpisodeBuffer
    from tqdm.auto import tqdm

    silence_mujoco()
    t0 = time.time()
    ctx = mp.get_context("spawn")  # never fork a process that may hold JAX's threads
    with (
        ctx.Pool(NUM_WORKERS) as pool,
        tqdm(total=num_steps, desc=f"collecting {dataset_id}", unit="step", mininterval=2.0) as pbar,
    ):
        episodes = collect_level(pool, robot, level, num_steps, seed, pbar)
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


# --- atomic build -----------------------------------------------------------------------------


def atomic_build(dataset_id: str, force: bool, write: Callable[[], None]) -> Path:
    """Run `write()` (which creates `dataset_id` through Minari) against a hidden staging root,
    then move the finished dataset into `$MINARI_DATASETS_PATH`."""
    root = datasets_root()
    final = root / dataset_id
    if is_built(dataset_id) and not force:
        print(f"{dataset_id} is already built at {final} (use --force to rebuild)", flush=True)
        return final
    root.mkdir(parents=True, exist_ok=True)
    staging = root / f".staging-{os.getpid()}-{time.time_ns()}"  # hidden: Minari never lists it
    previous = os.environ.get("MINARI_DATASETS_PATH")
    os.environ["MINARI_DATASETS_PATH"] = str(staging)
    try:
        write()
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    finally:
        if previous is None:
            os.environ.pop("MINARI_DATASETS_PATH", None)
        else:
            os.environ["MINARI_DATASETS_PATH"] = previous
    # Namespace metadata Minari wrote in staging (local/, local/<robot>/) goes along if missing.
    for ns_file in staging.rglob("namespace_metadata.json"):
        target = root / ns_file.relative_to(staging)
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(ns_file, target)
    final.parent.mkdir(parents=True, exist_ok=True)
    trash = None
    if final.exists():
        trash = root / f".trash-{os.getpid()}-{time.time_ns()}"
        os.replace(final, trash)
    os.replace(staging / dataset_id, final)
    shutil.rmtree(staging, ignore_errors=True)
    if trash is not None:
        shutil.rmtree(trash, ignore_errors=True)
    return final


def build(dataset_id: str, *, num_steps: int | None = None, seed: int = 0, force: bool = False) -> Path:
    """Build one local dataset (skipped if already built, unless `force`). Returns its folder."""
    kind, a, b = parse_id(dataset_id)
    if num_steps is not None and num_steps <= 0:
        raise ValueError(f"--num-steps must be positive, got {num_steps}")
    t0 = time.time()
    if kind == "locomotion":
        steps = num_steps or default_steps(a, b)
        if b in ("random", "medium", "expert", "medium-expert"):
            policy_path(a, "medium" if b == "medium-expert" else b)  # fail before staging if not shipped
        path = atomic_build(dataset_id, force, lambda: write_locomotion(dataset_id, a, b, steps, seed))
    else:
        import maze

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
    return 0


if __name__ == "__main__":
    sys.exit(main())
