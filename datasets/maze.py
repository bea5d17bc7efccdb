"""Local D4RL-style PointMaze datasets: `local/pointmaze/<maze>-<variant>-v0`.

    python datasets/make.py local/pointmaze/umaze-sparse-v0 [--num-steps N] [--seed S] [--force]

The recipe follows D4RL's maze2d and Minari's `D4RL/pointmaze` regeneration, with no learned
policy. Behaviour policy: a shortest path over the 4-connected free cells of the maze grid (BFS),
waypoints at the centres of the path's cells (each intermediate one jittered by up to 0.2 so paths
differ), the goal itself as the last waypoint, moving on to the next waypoint within 0.1 of the
current one; action = clip(10 * (waypoint - position) - 1 * velocity, -1, 1) plus Gaussian noise
of std 0.5, clipped again. The plan is redone whenever the goal changes.

Collection: `PointMaze_<Maze>[Dense]-v3` with `continuing_task=True, reset_target=True`, reset once
(seeded) for the whole run: one continuing trajectory whose goal the env redraws each time it is
reached. It is split into episodes where a goal is reached; a segment that has not reached its goal
within the evaluation horizon (300/300/600/800 steps) is cut the same way and a new goal is drawn
without moving the point; the trailing unfinished segment is dropped. Every episode ends with
truncation=True (never termination), every observation of an episode carries that episode's goal
(also the first, unlike Minari's own sets: Minari issue #265), and rewards are the env's own, from
the next observation: sparse 1[|achieved - desired| <= 0.45], dense exp(-|achieved - desired|).
The sparse and dense sets of one maze are the same trajectory (same seed), only the rewards differ.

Evaluation env (Minari's): the same env id with the maze map holding one goal cell at D4RL's goal
and every other free cell a reset cell, `continuing_task=True, reset_target=False`, the registered
time limit. Reference scores as Minari defines them, over 100 episodes from `reset(seed=123)` on
that env: `ref_min_score` = Minari's seeded RandomPolicy, `ref_max_score` = the noise-free
controller. The metadata also holds `expert_success_rate` and `dataset_success_rate`.

The planner (`shortest_path`, `WaypointPlanner`) and the collection loop (`collect_continuing`)
take a maze map and positions, not the point robot, so a later AntMaze can reuse them with its own
low-level `act` function.

Same bytes on every machine: the controller is elementwise float64 arithmetic and clipping, the
planner integer BFS, the noise and jitter numpy's PCG64, so none of it depends on the CPU. Two
places did, and are replaced here: distances to the goal were `np.linalg.norm` of a 2-vector, which
is a BLAS dot product whose last bit depends on OpenBLAS's per-CPU kernel (FMA or not; measured: 8%
of random 2-vectors differ between the SkylakeX and Haswell kernels), and the dense reward is
`np.exp`, which numpy computes with its own AVX512 code on AVX512 machines and with the C library
elsewhere (measured: different bits). `goal_distance` is sqrt(dx*dx + dy*dy) (IEEE-exact steps)
and `goal_reward` uses `policy.fixed_exp`; the stored rewards and the reference scores use them
instead of the env's reward (the same formula: sparse rewards are bit-identical to the env's, dense
ones within an ulp or two). What remains: gymnasium-robotics' own goal check
(`norm(achieved - goal) <= 0.45`, a BLAS dot) decides when the env redraws its goal, so a machine
could disagree only if a distance fell within one ulp of 0.45; and MuJoCo's use of the C math
library (see policy.py). Measured on one machine: a 50,000-step umaze-dense build gives the same
float64 rewards and observations with numpy at its SSE4.2 baseline plus OpenBLAS's Prescott kernel,
and with glibc's non-FMA math functions, as with the defaults.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from collections import deque
from collections.abc import Callable, Sequence
from contextlib import contextmanager

import gymnasium as gym
import numpy as np
from policy import fixed_exp

MAZES = ("open", "umaze", "medium", "large")
VARIANTS = ("sparse", "dense")
ENV_NAMES = {
    "open": "PointMaze_Open",
    "umaze": "PointMaze_UMaze",
    "medium": "PointMaze_Medium",
    "large": "PointMaze_Large",
}
HORIZONS = {"open": 300, "umaze": 300, "medium": 600, "large": 800}  # registered time limits = eval horizons
EVAL_GOAL_CELLS = {
    "open": (2, 3),
    "umaze": (1, 1),
    "medium": (6, 6),
    "large": (7, 9),
}  # D4RL's goals (row, col)
DEFAULT_STEPS = 1_000_000
REF_EPISODES = 100  # Minari's num_episodes_average_score
GOAL_RADIUS = 0.45  # the env's success radius

# Behaviour policy (D4RL's and Minari's gains and noise). Lengths are in maze cells (x scaling).
P_GAIN, D_GAIN = 10.0, 1.0
ACTION_NOISE = 0.5
WAYPOINT_JITTER = 0.2
WAYPOINT_RADIUS = 0.1

NEIGHBOURS = ((-1, 0), (1, 0), (0, -1), (0, 1))  # fixed order: ties between shortest paths break the same way


def env_id(maze: str, variant: str) -> str:
    return f"{ENV_NAMES[maze]}{'Dense' if variant == 'dense' else ''}-v3"


def require_robotics():
    """Import gymnasium-robotics and register its envs; a clear error naming the package if missing."""
    try:
        import gymnasium_robotics
    except ImportError as e:
        raise ImportError(
            "local/pointmaze datasets need the gymnasium-robotics package: pip install gymnasium-robotics "
            "(or reinstall jaxorl, which depends on it)"
        ) from e
    import gymnasium as gym

    gym.register_envs(gymnasium_robotics)
    return gymnasium_robotics


def check_num_steps(maze: str, num_steps: int | None) -> int:
    """The number of env steps to run: DEFAULT_STEPS for None; a ValueError if too small for one episode."""
    steps = DEFAULT_STEPS if num_steps is None else int(num_steps)
    horizon = HORIZONS[maze]
    if steps < horizon:
        raise ValueError(
            f"--num-steps {steps} is too small for local/pointmaze/{maze}: an episode can take up to "
            f"{horizon} steps (the eval horizon) before it is cut, so give at least {horizon}"
        )
    return steps


# --- grid planner (any maze map; cells are (row, col), 1 = wall) --------------------------------


def free_grid(maze_map: Sequence[Sequence]) -> np.ndarray:
    """Bool grid, True where the cell is not a wall (0, 'r', 'g' and 'c' cells are all free)."""
    return np.array([[cell != 1 for cell in row] for row in maze_map], bool)


def grid_distances(maze_map: Sequence[Sequence], goal_cell: tuple[int, int]) -> np.ndarray:
    """BFS steps from every cell to `goal_cell` over 4-connected free cells (-1: unreachable or wall)."""
    free = free_grid(maze_map)
    dist = np.full(free.shape, -1, np.int64)
    goal_cell = (int(goal_cell[0]), int(goal_cell[1]))
    if not free[goal_cell]:
        raise ValueError(f"goal cell {goal_cell} is a wall")
    dist[goal_cell] = 0
    queue = deque([goal_cell])
    while queue:
        i, j = queue.popleft()
        for di, dj in NEIGHBOURS:
            n = (i + di, j + dj)
            if 0 <= n[0] < free.shape[0] and 0 <= n[1] < free.shape[1] and free[n] and dist[n] < 0:
                dist[n] = dist[i, j] + 1
                queue.append(n)
    return dist


def path_from_distances(dist: np.ndarray, start_cell: tuple[int, int]) -> list[tuple[int, int]]:
    """Follow decreasing BFS distance from `start_cell` to the goal (distance 0); both ends included."""
    cell = (int(start_cell[0]), int(start_cell[1]))
    if dist[cell] < 0:
        raise ValueError(f"cell {cell} cannot reach the goal")
    path = [cell]
    while dist[cell] > 0:
        for di, dj in NEIGHBOURS:
            n = (cell[0] + di, cell[1] + dj)
            if 0 <= n[0] < dist.shape[0] and 0 <= n[1] < dist.shape[1] and dist[n] == dist[cell] - 1:
                cell = n
                break
        path.append(cell)
    return path


def shortest_path(maze_map: Sequence[Sequence], start_cell, goal_cell) -> list[tuple[int, int]]:
    """A shortest 4-connected path of free cells from start to goal, both included."""
    return path_from_distances(grid_distances(maze_map, goal_cell), start_cell)


def cell_to_xy(cell, maze_map: Sequence[Sequence], scaling: float = 1.0) -> np.ndarray:
    """Centre of cell (row, col) in world coordinates (gymnasium-robotics' Maze.cell_rowcol_to_xy)."""
    rows, cols = len(maze_map), len(maze_map[0])
    return np.array([(cell[1] + 0.5) * scaling - cols / 2 * scaling, rows / 2 * scaling - (cell[0] + 0.5) * scaling])


def xy_to_cell(xy, maze_map: Sequence[Sequence], scaling: float = 1.0) -> tuple[int, int]:
    """The (row, col) cell holding world position `xy` (gymnasium-robotics' Maze.cell_xy_to_rowcol)."""
    rows, cols = len(maze_map), len(maze_map[0])
    return int(np.floor((rows / 2 * scaling - xy[1]) / scaling)), int(np.floor((xy[0] + cols / 2 * scaling) / scaling))


class WaypointPlanner:
    """Waypoints along a shortest grid path to a goal position.

    `plan(position, goal)` lays the waypoints: the centres of the path's cells after the current one
    (each jittered uniformly by up to `jitter` cells per axis when an `rng` is given), then the goal
    itself. `waypoint(position)` returns the current waypoint, moving on to the next once within
    `radius` cells of it (never past the goal). Distance fields are cached per goal cell.
    """

    def __init__(
        self,
        maze_map,
        scaling: float = 1.0,
        jitter: float = WAYPOINT_JITTER,
        radius: float = WAYPOINT_RADIUS,
        rng=None,
    ):
        self.maze_map = [list(row) for row in maze_map]
        self.free = free_grid(self.maze_map)
        self.scaling = float(scaling)
        self.jitter = float(jitter) * self.scaling
        self.radius = float(radius) * self.scaling
        self.rng = rng
        self._dist: dict[tuple[int, int], np.ndarray] = {}
        self.waypoints: list[np.ndarray] = []
        self.index = 0

    def cell(self, xy) -> tuple[int, int]:
        cell = xy_to_cell(xy, self.maze_map, self.scaling)
        if 0 <= cell[0] < self.free.shape[0] and 0 <= cell[1] < self.free.shape[1] and self.free[cell]:
            return cell
        # On a wall cell's edge (rounding): the nearest free cell centre.
        free = np.argwhere(self.free)
        centres = np.stack([cell_to_xy(c, self.maze_map, self.scaling) for c in free])
        return tuple(int(v) for v in free[np.argmin(np.linalg.norm(centres - np.asarray(xy), axis=1))])

    def path(self, start_cell, goal_cell) -> list[tuple[int, int]]:
        goal_cell = (int(goal_cell[0]), int(goal_cell[1]))
        if goal_cell not in self._dist:
            self._dist[goal_cell] = grid_distances(self.maze_map, goal_cell)
        return path_from_distances(self._dist[goal_cell], start_cell)

    def plan(self, position, goal) -> None:
        cells = self.path(self.cell(position), self.cell(goal))
        waypoints = []
        for c in cells[1:-1]:
            w = cell_to_xy(c, self.maze_map, self.scaling)
            if self.rng is not None and self.jitter > 0:
                w = w + self.rng.uniform(-self.jitter, self.jitter, size=2)
            waypoints.append(w)
        waypoints.append(np.array(goal, np.float64))
        self.waypoints, self.index = waypoints, 0

    def waypoint(self, position) -> np.ndarray:
        w = self.waypoints[self.index]
        if self.index < len(self.waypoints) - 1:
            dx, dy = w[0] - position[0], w[1] - position[1]
            if dx * dx + dy * dy <= self.radius * self.radius:
                self.index += 1
                w = self.waypoints[self.index]
        return w


def point_action(observation: np.ndarray, waypoint: np.ndarray, noise: np.ndarray | None = None) -> np.ndarray:
    """The point's PD controller: clip(10 (waypoint - position) - 1 velocity, -1, 1) [+ noise, clipped]."""
    a = np.clip(P_GAIN * (waypoint - observation[:2]) - D_GAIN * observation[2:4], -1.0, 1.0)
    if noise is not None:
        a = np.clip(a + noise, -1.0, 1.0)
    return a


# --- goal distance and reward, in fixed-order arithmetic ------------------------------------------


def goal_distance(achieved_goal: np.ndarray, desired_goal: np.ndarray) -> np.ndarray:
    """|achieved - desired| over the last axis (2-D positions) as sqrt(dx*dx + dy*dy): each step is
    one IEEE-rounded operation, so the bits do not depend on the CPU (`np.linalg.norm` of a vector
    is a BLAS dot whose rounding does). Equal to `np.linalg.norm(..., axis=-1)` bit for bit."""
    d = np.asarray(achieved_goal, np.float64) - np.asarray(desired_goal, np.float64)
    return np.sqrt(d[..., 0] * d[..., 0] + d[..., 1] * d[..., 1])


def goal_reward(achieved_goal: np.ndarray, desired_goal: np.ndarray, reward_type: str) -> np.ndarray:
    """The maze env's reward (MazeEnv.compute_reward): sparse 1[distance <= 0.45], dense
    exp(-distance) with `policy.fixed_exp` (numpy's `np.exp` differs between AVX512 and other CPUs)."""
    distance = goal_distance(achieved_goal, desired_goal)
    if reward_type == "dense":
        return fixed_exp(-distance)
    if reward_type == "sparse":
        return (distance <= GOAL_RADIUS).astype(np.float64)
    raise ValueError(f"unknown maze reward type {reward_type!r}")


class FixedReward(gym.Wrapper):
    """A maze env whose `step` returns `goal_reward` of its observation (for the reference scores)."""

    def __init__(self, env):
        super().__init__(env)
        self.reward_type = env.unwrapped.reward_type

    def step(self, action):
        obs, _, terminated, truncated, info = self.env.step(action)
        reward = float(goal_reward(obs["achieved_goal"], obs["desired_goal"], self.reward_type))
        return obs, reward, terminated, truncated, info


# --- collection (any MazeEnv: PointMaze or AntMaze) ---------------------------------------------


def redraw_goal(maze_env, achieved_goal: np.ndarray) -> None:
    """Draw a new goal as the env does when one is reached (gymnasium-robotics' MazeEnv.update_goal):
    from its goal cells with its position noise and its RNG, until farther than the goal radius."""
    while True:
        maze_env.goal = maze_env.add_xy_position_noise(maze_env.generate_target_goal())
        if goal_distance(achieved_goal, maze_env.goal) > GOAL_RADIUS:
            break
    maze_env.update_target_site_pos()


def collect_continuing(
    env,
    planner: WaypointPlanner,
    act: Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray],
    num_steps: int,
    horizon: int,
    seed: int,
    noise_std: float = ACTION_NOISE,
    progress: Callable[[int], None] | None = None,
) -> dict:
    """Run one continuing trajectory of `num_steps` steps and split it into goal-reaching episodes.

    `env` is a maze env made with `continuing_task=True, reset_target=True` (its goal is redrawn by
    the env when reached); it is reset once with `seed`. `act(observation, waypoint, noise)` maps the
    robot's observation and the planner's waypoint to an action (noise: a standard-normal draw times
    `noise_std`, one per step). A segment is cut when its goal is reached (the env changed the goal)
    or after `horizon` steps without reaching it (then a new goal is drawn here, the robot is not
    moved). The trailing unfinished segment is dropped.

    Returns flat arrays over the kept steps (observations and achieved goals with one row per
    visited state, actions and rewards per step), `starts`/`ends` (state row indices: episode k
    spans states starts[k]..ends[k] inclusive, steps starts[k]..ends[k]-1), the goal and whether it
    was reached for every episode, and the collection time.
    """
    u = env.unwrapped
    reward_type = u.reward_type
    obs, _ = u.reset(seed=seed)
    noise_rng = np.random.default_rng([seed, 1])
    action_dim = u.action_space.shape[0]
    observations = np.empty((num_steps + 1, obs["observation"].shape[0]), np.float64)
    achieved = np.empty((num_steps + 1, obs["achieved_goal"].shape[0]), np.float64)
    actions = np.empty((num_steps, action_dim), np.float32)
    rewards = np.empty(num_steps, np.float64)
    observations[0], achieved[0] = obs["observation"], obs["achieved_goal"]
    goal = u.goal.copy()
    planner.plan(obs["achieved_goal"], goal)
    starts, ends, goals, reached = [], [], [], []
    seg_start = 0
    block = 4096
    noise = None
    t0 = time.perf_counter()
    for t in range(num_steps):
        if t % block == 0:
            noise = noise_std * noise_rng.standard_normal((block, action_dim))
            if progress is not None and t:
                progress(block)  # steps t - block .. t - 1
        a = act(obs["observation"], planner.waypoint(obs["achieved_goal"]), noise[t % block]).astype(np.float32)
        obs, _, _, _, _ = u.step(a)
        # The env's reward for this step, recomputed in fixed-order arithmetic (see goal_reward).
        actions[t], rewards[t] = a, goal_reward(obs["achieved_goal"], goal, reward_type)
        observations[t + 1], achieved[t + 1] = obs["observation"], obs["achieved_goal"]
        hit = not np.array_equal(u.goal, goal)  # the env redrew its goal: this one was reached
        if hit or t + 1 - seg_start >= horizon:
            if not hit:
                redraw_goal(u, obs["achieved_goal"])
            starts.append(seg_start)
            ends.append(t + 1)
            goals.append(goal)
            reached.append(hit)
            seg_start = t + 1
            goal = u.goal.copy()
            planner.plan(obs["achieved_goal"], goal)
    if progress is not None and num_steps:
        progress(num_steps - block * ((num_steps - 1) // block))  # the last (partial) block
    last = ends[-1] if ends else 0
    return {
        "observations": observations[: last + 1],
        "achieved_goals": achieved[: last + 1],
        "actions": actions[:last],
        "rewards": rewards[:last],
        "starts": np.asarray(starts, np.int64),
        "ends": np.asarray(ends, np.int64),
        "goals": np.asarray(goals, np.float64).reshape(len(goals), -1),
        "reached": np.asarray(reached, bool),
        "seconds": time.perf_counter() - t0,
    }


def episode_buffers(traj: dict) -> list:
    """Minari EpisodeBuffers: dict observations with the episode's goal on every row, truncation only."""
    from minari.data_collector import EpisodeBuffer

    buffers = []
    for k, (s, e) in enumerate(zip(traj["starts"], traj["ends"])):
        T = int(e - s)
        achieved = traj["achieved_goals"][s : e + 1]
        desired = np.repeat(traj["goals"][k][None], T + 1, axis=0)
        truncations = np.zeros(T, bool)
        truncations[-1] = True
        buffers.append(
            EpisodeBuffer(
                id=k,
                observations={
                    "observation": traj["observations"][s : e + 1].copy(),
                    "achieved_goal": achieved.copy(),
                    "desired_goal": desired,
                },
                actions=traj["actions"][s:e].copy(),
                rewards=traj["rewards"][s:e].copy(),
                terminations=np.zeros(T, bool),
                truncations=truncations,
                infos={"success": np.linalg.norm(achieved - desired, axis=1) <= GOAL_RADIUS},
            )
        )
    return buffers


# --- environments and reference scores ----------------------------------------------------------


def maze_map_of(maze: str) -> list[list]:
    import gymnasium as gym

    return [list(row) for row in gym.spec(env_id(maze, "sparse")).kwargs["maze_map"]]


def eval_maze_map(maze: str) -> list[list]:
    """Minari's evaluation map: one 'g' cell at D4RL's goal, every other free cell an 'r' cell."""
    goal = EVAL_GOAL_CELLS[maze]
    return [
        [1 if c == 1 else ("g" if (i, j) == goal else "r") for j, c in enumerate(row)]
        for i, row in enumerate(maze_map_of(maze))
    ]


def make_collection_env(maze: str, variant: str):
    import gymnasium as gym

    return gym.make(env_id(maze, variant), continuing_task=True, reset_target=True)


def make_eval_env(maze: str, variant: str):
    import gymnasium as gym

    return gym.make(env_id(maze, variant), maze_map=eval_maze_map(maze), continuing_task=True, reset_target=False)


class ExpertPolicy:
    """The noise-free controller as a policy of the dict observation. It replans whenever the
    observed goal changes, so its state starts afresh every episode (each reset draws a new goal)."""

    def __init__(self, maze_map, scaling: float = 1.0):
        self.planner = WaypointPlanner(maze_map, scaling, jitter=0.0)
        self.goal = None

    def reset(self) -> None:
        self.goal = None

    def __call__(self, obs: dict) -> np.ndarray:
        if self.goal is None or not np.array_equal(obs["desired_goal"], self.goal):
            self.goal = obs["desired_goal"].copy()
            self.planner.plan(obs["achieved_goal"], self.goal)
        return point_action(obs["observation"], self.planner.waypoint(obs["achieved_goal"])).astype(np.float32)


def expert_returns(env, policy: ExpertPolicy, num_episodes: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-episode returns and successes (goal reached at least once) of `policy`, with Minari's
    protocol (`minari.utils.get_average_reference_score`): reset(seed=123), then plain resets."""
    returns, successes = np.zeros(num_episodes), np.zeros(num_episodes, bool)
    obs, _ = env.reset(seed=123)
    for k in range(num_episodes):
        policy.reset()
        while True:
            obs, r, term, trunc, info = env.step(policy(obs))
            returns[k] += r
            successes[k] |= bool(info["success"])
            if term or trunc:
                obs, _ = env.reset()
                break
    return returns, successes


def reference_scores(maze: str, variant: str, num_episodes: int | None = None) -> dict:
    """ref_min (Minari's RandomPolicy), ref_max and the expert's success rate, on the eval env,
    over `num_episodes` (default REF_EPISODES) episodes each."""
    from minari.utils import RandomPolicy, get_average_reference_score

    num_episodes = REF_EPISODES if num_episodes is None else num_episodes

    env = make_eval_env(maze, variant)
    try:
        ref_min = get_average_reference_score(FixedReward(env), RandomPolicy(env), num_episodes)
    finally:
        env.close()
    env = make_eval_env(maze, variant)
    try:
        returns, successes = expert_returns(FixedReward(env), ExpertPolicy(eval_maze_map(maze)), num_episodes)
    finally:
        env.close()
    return {
        "ref_min_score": float(ref_min),
        "ref_max_score": float(np.mean(returns, dtype=np.float32)),  # as Minari averages
        "expert_success_rate": float(successes.mean()),
    }


# --- the build ------------------------------------------------------------------------------------


@contextmanager
def private_tmpdir():
    """gymnasium-robotics writes a maze XML into the temp dir on every env build and never deletes
    it: point TMPDIR (and tempfile) at a private folder for the build and remove it afterwards."""
    tmp = tempfile.mkdtemp(prefix="jaxorl-maze-")
    old_env, old_tempdir = os.environ.get("TMPDIR"), tempfile.tempdir
    os.environ["TMPDIR"] = tmp
    tempfile.tempdir = tmp
    try:
        yield tmp
    finally:
        tempfile.tempdir = old_tempdir
        if old_env is None:
            os.environ.pop("TMPDIR", None)
        else:
            os.environ["TMPDIR"] = old_env
        shutil.rmtree(tmp, ignore_errors=True)


def code_version() -> str:
    try:
        out = subprocess.run(
            ["git", "describe", "--always", "--dirty"],
            cwd=os.path.dirname(os.path.abspath(__file__)),
            capture_output=True,
            text=True,
            timeout=5,
        )
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def write_maze(dataset_id: str, maze: str, variant: str, num_steps: int | None, seed: int) -> None:
    """Collect and write `dataset_id` through Minari (hdf5) under the current $MINARI_DATASETS_PATH."""
    if maze not in MAZES or variant not in VARIANTS:
        raise ValueError(f"unknown maze {maze!r} or variant {variant!r}: mazes {MAZES}, variants {VARIANTS}")
    steps = check_num_steps(maze, num_steps)
    require_robotics()
    import minari
    import mujoco
    from tqdm.auto import tqdm

    mujoco.set_mju_user_warning(lambda msg: None)
    t_start = time.time()
    with private_tmpdir():
        env = make_collection_env(maze, variant)
        horizon = HORIZONS[maze]
        assert env.spec.max_episode_steps == horizon, (env.spec.max_episode_steps, horizon)
        planner = WaypointPlanner(maze_map_of(maze), rng=np.random.default_rng([seed, 2]))
        with tqdm(total=steps, desc=f"collecting {dataset_id}", unit="step", mininterval=2.0) as pbar:
            traj = collect_continuing(env, planner, point_action, steps, horizon, seed, progress=pbar.update)
        n_eps = len(traj["starts"])
        if n_eps == 0:
            raise ValueError(f"--num-steps {steps} finished no episode of {dataset_id}; give more steps")
        kept = len(traj["rewards"])
        lengths = traj["ends"] - traj["starts"]
        print(
            f"collected {steps} steps in {traj['seconds']:.1f} s ({steps / traj['seconds']:.0f} steps/s): "
            f"{n_eps} episodes, {kept} steps kept, {traj['reached'].mean():.1%} reached their goal",
            flush=True,
        )
        t_ref = time.time()
        refs = reference_scores(maze, variant)
        t_ref = time.time() - t_ref
        print(
            f"reference scores in {t_ref:.1f} s: min {refs['ref_min_score']:.2f}, "
            f"max {refs['ref_max_score']:.2f}, expert success {refs['expert_success_rate']:.0%}",
            flush=True,
        )
        description = (
            f"jaxorl local D4RL-style PointMaze dataset ({maze}, {variant} reward): one continuing "
            f"trajectory of {steps} steps of {env_id(maze, variant)} (continuing_task=True, "
            f"reset_target=True, seed {seed}) split into {n_eps} goal-reaching episodes ({kept} steps "
            f"kept; an episode ends where its goal is reached, or after {horizon} steps without it). "
            "Behaviour policy: BFS shortest path on the maze grid, jittered cell-centre waypoints, PD "
            f"control clip(10*(waypoint-pos) - vel) plus N(0, {ACTION_NOISE}) noise. Every observation "
            "carries its episode's goal. ref_min_score: Minari's RandomPolicy; ref_max_score: the "
            f"noise-free controller; {REF_EPISODES} episodes of the eval env from reset(seed=123). "
            f"Built by `python datasets/make.py {dataset_id}` at code version {code_version()}."
        )
        eval_env = make_eval_env(maze, variant)
        t_write = time.time()
        dataset = minari.create_dataset_from_buffers(
            dataset_id=dataset_id,
            buffer=episode_buffers(traj),
            env=env,
            eval_env=eval_env,
            algorithm_name="BFS waypoint planner + PD controller (D4RL maze2d recipe)",
            code_permalink=f"jaxorl datasets/maze.py @ {code_version()}",
            author="jaxorl",
            author_email="jaxorl@users.noreply.github.com",
            ref_min_score=refs["ref_min_score"],
            ref_max_score=refs["ref_max_score"],
            num_episodes_average_score=REF_EPISODES,
            description=description,
            data_format="hdf5",
        )
        dataset.storage.update_metadata(
            {
                "expert_success_rate": refs["expert_success_rate"],
                "dataset_success_rate": float(traj["reached"].mean()),
                "mean_episode_length": float(lengths.mean()),
                "collection_steps": steps,
                "collection_seed": seed,
            }
        )
        env.close()
        eval_env.close()
    print(
        f"wrote {n_eps} episodes in {time.time() - t_write:.1f} s; build {time.time() - t_start:.1f} s",
        flush=True,
    )
