"""Local PointMaze datasets (datasets/maze.py through datasets/make.py): small builds into the
conftest's temporary MINARI_DATASETS_PATH, with the reference scores over a few episodes only."""

import json
import os
import sys
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest

MAZES = ("open", "umaze", "medium", "large")
SMALL_STEPS = 2_000
REF_EPISODES = 2  # instead of Minari's 100, to keep the file fast


@pytest.fixture(scope="module")
def maze_module(make_module):
    import maze  # make.py put datasets/ on sys.path

    maze.require_robotics()
    return maze


@pytest.fixture(scope="module")
def built(make_module, maze_module):
    """Every maze's sparse set and umaze's dense set, 2k steps each, seed 0."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(maze_module, "REF_EPISODES", REF_EPISODES)
        ids = [f"local/pointmaze/{m}-sparse-v0" for m in MAZES] + ["local/pointmaze/umaze-dense-v0"]
        for dataset_id in ids:
            make_module.build(dataset_id, num_steps=SMALL_STEPS, seed=0, force=True)
    return ids


def episodes_of(dataset_id):
    import minari

    return list(minari.load_dataset(dataset_id).iterate_episodes())


def metadata_of(dataset_id, root=None):
    root = Path(root or os.environ["MINARI_DATASETS_PATH"])
    return json.loads((root / dataset_id / "data" / "metadata.json").read_text())


def listing(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*")) if root.exists() else []


# --- the datasets -----------------------------------------------------------------------------


@pytest.mark.parametrize("maze", MAZES)
def test_builds_and_loads_with_the_spaces(built, maze, maze_module):
    import minari

    dataset_id = f"local/pointmaze/{maze}-sparse-v0"
    ds = minari.load_dataset(dataset_id)
    obs_space = ds.observation_space
    assert isinstance(obs_space, gym.spaces.Dict)
    assert {k: (s.shape, s.dtype) for k, s in obs_space.spaces.items()} == {
        "observation": ((4,), np.float64),
        "achieved_goal": ((2,), np.float64),
        "desired_goal": ((2,), np.float64),
    }
    assert ds.action_space.shape == (2,) and ds.action_space.dtype == np.float32
    assert np.all(ds.action_space.low == -1) and np.all(ds.action_space.high == 1)
    meta = metadata_of(dataset_id)
    assert meta["data_format"] == "hdf5"
    # All complete episodes of a 2k-step run, never longer than the horizon.
    horizon = maze_module.HORIZONS[maze]
    assert SMALL_STEPS - horizon <= meta["total_steps"] <= SMALL_STEPS
    eps = list(ds.iterate_episodes())
    assert len(eps) == meta["total_episodes"] >= 2
    lengths = np.array([len(ep.rewards) for ep in eps])
    assert lengths.max() <= horizon and lengths.sum() == meta["total_steps"]
    for ep in eps:
        assert ep.observations["observation"].dtype == np.float64
        assert ep.actions.dtype == np.float32 and np.all(np.abs(ep.actions) <= 1)
        assert ep.observations["observation"].shape == (len(ep.rewards) + 1, 4)
    # The collection env spec.
    spec = ds.spec.env_spec
    assert spec.id == maze_module.env_id(maze, "sparse")
    assert spec.kwargs["continuing_task"] is True and spec.kwargs["reset_target"] is True
    # Success rates and reference scores in the metadata.
    assert 0.95 <= meta["dataset_success_rate"] <= 1.0
    assert meta["expert_success_rate"] == 1.0
    assert meta["ref_max_score"] > meta["ref_min_score"] >= 0
    reached = np.mean([bool(ep.infos["success"][-1]) for ep in eps])
    assert reached == pytest.approx(meta["dataset_success_rate"])


@pytest.mark.parametrize("dataset_id", ["local/pointmaze/umaze-sparse-v0", "local/pointmaze/umaze-dense-v0"])
def test_episodes_truncate_keep_their_goal_and_rewards_are_the_envs(built, dataset_id):
    eps = episodes_of(dataset_id)
    dense = "dense" in dataset_id
    for k, ep in enumerate(eps):
        T = len(ep.rewards)
        assert not np.any(ep.terminations)
        assert ep.truncations[-1] and not np.any(ep.truncations[:-1])
        desired = ep.observations["desired_goal"]
        assert np.all(desired == desired[0])  # the first observation included (Minari issue #265)
        assert np.array_equal(ep.observations["achieved_goal"], ep.observations["observation"][:, :2])
        dist = np.linalg.norm(ep.observations["achieved_goal"][1:] - desired[1:], axis=1)
        if dense:
            np.testing.assert_allclose(ep.rewards, np.exp(-dist), rtol=1e-12, atol=0)
        else:
            np.testing.assert_array_equal(ep.rewards, (dist <= 0.45).astype(np.float64))
        # An episode ends where its goal is reached (or at the horizon), not earlier.
        assert not np.any(dist[:-1] <= 0.45)
        assert len(ep.infos["success"]) == T + 1
        if k + 1 < len(eps):  # one continuing trajectory: the next episode starts where this one ended
            nxt = eps[k + 1]
            assert np.array_equal(nxt.observations["observation"][0], ep.observations["observation"][-1])
            assert not np.array_equal(nxt.observations["desired_goal"][0], desired[0])
    if not dense:
        assert sum(ep.rewards.sum() for ep in eps) >= 0.95 * len(eps)  # a reached goal pays 1 at the end


def test_sparse_and_dense_share_the_trajectory(built):
    sparse, dense = (
        episodes_of("local/pointmaze/umaze-sparse-v0"),
        episodes_of("local/pointmaze/umaze-dense-v0"),
    )
    assert len(sparse) == len(dense)
    for a, b in zip(sparse, dense):
        for key in ("observation", "achieved_goal", "desired_goal"):
            assert np.array_equal(a.observations[key], b.observations[key])
        assert np.array_equal(a.actions, b.actions)
        assert not np.array_equal(a.rewards, b.rewards)


def test_same_seed_is_identical_and_another_seed_differs(make_module, maze_module, monkeypatch, tmp_path):
    import minari

    monkeypatch.setattr(maze_module, "REF_EPISODES", REF_EPISODES)
    dataset_id = "local/pointmaze/open-dense-v0"
    runs = {}
    for name, seed in (("a", 3), ("b", 3), ("c", 4)):
        monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path / name))
        make_module.build(dataset_id, num_steps=1_000, seed=seed)
        eps = list(minari.load_dataset(dataset_id).iterate_episodes())
        runs[name] = {
            "obs": np.concatenate([ep.observations["observation"] for ep in eps]),
            "goal": np.concatenate([ep.observations["desired_goal"] for ep in eps]),
            "actions": np.concatenate([ep.actions for ep in eps]),
            "rewards": np.concatenate([ep.rewards for ep in eps]),
            "refs": [metadata_of(dataset_id, tmp_path / name)[k] for k in ("ref_min_score", "ref_max_score")],
        }
    for key in runs["a"]:
        assert np.array_equal(runs["a"][key], runs["b"][key]), key
    assert runs["a"]["actions"].shape != runs["c"]["actions"].shape or not np.array_equal(
        runs["a"]["actions"], runs["c"]["actions"]
    )
    assert not np.array_equal(runs["a"]["obs"][0], runs["c"]["obs"][0])


@pytest.mark.parametrize("maze", MAZES)
def test_eval_env_recovers_with_one_goal_cell(built, maze, maze_module):
    import minari

    ds = minari.load_dataset(f"local/pointmaze/{maze}-sparse-v0")
    env = ds.recover_environment(eval_env=True)
    try:
        spec = env.spec
        assert spec.id == maze_module.env_id(maze, "sparse")
        assert spec.kwargs["continuing_task"] is True and spec.kwargs["reset_target"] is False
        assert spec.max_episode_steps == {"open": 300, "umaze": 300, "medium": 600, "large": 800}[maze]
        assert spec.max_episode_steps == gym.spec(spec.id).max_episode_steps  # the registered limit
        maze_map = spec.kwargs["maze_map"]
        goal_cells = [(i, j) for i, row in enumerate(maze_map) for j, c in enumerate(row) if c == "g"]
        assert goal_cells == [{"open": (2, 3), "umaze": (1, 1), "medium": (6, 6), "large": (7, 9)}[maze]]
        original = gym.spec(spec.id).kwargs["maze_map"]
        for i, row in enumerate(maze_map):
            for j, c in enumerate(row):
                assert (c == 1) == (original[i][j] == 1)
                assert c in (1, "g", "r")
        obs, _ = env.reset(seed=0)
        goal_xy = maze_module.cell_to_xy(goal_cells[0], maze_map)
        assert np.all(np.abs(obs["desired_goal"] - goal_xy) <= 0.25 + 1e-9)
    finally:
        env.close()


def test_reference_scores_follow_minaris_protocol(built, maze_module):
    """ref_min is Minari's get_average_reference_score with its RandomPolicy; ref_max the same
    protocol with the noise-free controller; the sparse expert sits on the goal most of the horizon."""
    from minari.utils import RandomPolicy, get_average_reference_score

    meta = metadata_of("local/pointmaze/umaze-sparse-v0")
    env = maze_module.make_eval_env("umaze", "sparse")
    assert get_average_reference_score(env, RandomPolicy(env), REF_EPISODES) == meta["ref_min_score"]
    env = maze_module.make_eval_env("umaze", "sparse")
    expert = maze_module.ExpertPolicy(maze_module.eval_maze_map("umaze"))
    assert get_average_reference_score(env, expert, REF_EPISODES) == meta["ref_max_score"]
    assert meta["ref_max_score"] >= 0.5 * 300
    assert meta["num_episodes_average_score"] == REF_EPISODES


def test_common_loader_flattens_observation_and_goal(built, maze_module):
    from common.data import load_dataset

    data, meta = load_dataset("local/pointmaze/umaze-sparse-v0", to_device=False)
    eps = episodes_of("local/pointmaze/umaze-sparse-v0")
    assert meta.domain == "pointmaze" and meta.obs_dim == 6
    first = eps[0]
    np.testing.assert_array_equal(
        data.observations[0],
        np.concatenate([first.observations["observation"][0], first.observations["desired_goal"][0]]).astype(
            np.float32
        ),
    )
    assert not data.terminals.any() and data.truncations.sum() == len(eps)
    assert meta.env_spec.kwargs["reset_target"] is False
    env = meta.make_env()
    try:
        obs, _ = env.reset(seed=1)
        _, _, _, _, info = env.step(np.zeros(2, np.float32))
        assert "success" in info and env.spec.max_episode_steps == 300
    finally:
        env.close()


# --- planner and controller -----------------------------------------------------------------------


def test_shortest_path_on_umaze_by_hand(maze_module):
    from gymnasium_robotics.envs.maze.maps import U_MAZE

    assert maze_module.shortest_path(U_MAZE, (3, 1), (1, 1)) == [
        (3, 1),
        (3, 2),
        (3, 3),
        (2, 3),
        (1, 3),
        (1, 2),
        (1, 1),
    ]
    assert maze_module.shortest_path(U_MAZE, (1, 2), (1, 2)) == [(1, 2)]
    assert maze_module.shortest_path(U_MAZE, (2, 3), (3, 2)) == [(2, 3), (3, 3), (3, 2)]
    with pytest.raises(ValueError, match="wall"):
        maze_module.shortest_path(U_MAZE, (1, 1), (2, 2))


@pytest.mark.parametrize("maze", MAZES)
def test_planner_paths_are_shortest(maze, maze_module):
    maze_map = maze_module.maze_map_of(maze)
    free = maze_module.free_grid(maze_map)
    cells = [tuple(int(v) for v in c) for c in np.argwhere(free)]
    index = {c: k for k, c in enumerate(cells)}
    # Floyd-Warshall over the 4-connected free cells: an independent all-pairs distance.
    n = len(cells)
    d = np.full((n, n), np.inf)
    np.fill_diagonal(d, 0)
    for (i, j), k in index.items():
        for n2 in ((i + 1, j), (i - 1, j), (i, j + 1), (i, j - 1)):
            if n2 in index:
                d[k, index[n2]] = 1
    for m in range(n):
        d = np.minimum(d, d[:, m : m + 1] + d[m : m + 1, :])
    for start in cells:
        for goal in cells:
            path = maze_module.shortest_path(maze_map, start, goal)
            assert path[0] == start and path[-1] == goal
            assert len(path) - 1 == d[index[start], index[goal]]
            for a, b in zip(path, path[1:]):
                assert b in index and abs(a[0] - b[0]) + abs(a[1] - b[1]) == 1


def test_planner_waypoints_follow_the_path(maze_module):
    from gymnasium_robotics.envs.maze.maps import U_MAZE

    start, goal = maze_module.cell_to_xy((3, 1), U_MAZE), maze_module.cell_to_xy((1, 1), U_MAZE) + 0.1
    planner = maze_module.WaypointPlanner(U_MAZE, rng=np.random.default_rng(0))
    planner.plan(start, goal)
    centres = [maze_module.cell_to_xy(c, U_MAZE) for c in [(3, 2), (3, 3), (2, 3), (1, 3), (1, 2)]]
    assert len(planner.waypoints) == 6 and np.array_equal(planner.waypoints[-1], goal)
    offsets = np.array([w - c for w, c in zip(planner.waypoints, centres)])
    assert np.all(np.abs(offsets) <= 0.2) and np.any(offsets != 0)  # jittered, within 0.2
    # Moves on only within 0.1 of the current waypoint, and never past the goal.
    assert np.array_equal(planner.waypoint(start), planner.waypoints[0])
    assert np.array_equal(planner.waypoint(planner.waypoints[0] + 0.05), planner.waypoints[1])
    for w in planner.waypoints:
        planner.waypoint(w)
    assert planner.index == 5 and np.array_equal(planner.waypoint(goal), goal)


def test_point_action_gains_and_clipping(maze_module):
    obs = np.array([0.0, 0.0, 0.2, -0.1])
    a = maze_module.point_action(obs, np.array([0.05, 0.01]))
    np.testing.assert_allclose(a, [10 * 0.05 - 0.2, 10 * 0.01 + 0.1])
    np.testing.assert_array_equal(maze_module.point_action(obs, np.array([3.0, -3.0])), [1.0, -1.0])
    np.testing.assert_array_equal(
        maze_module.point_action(obs, np.array([3.0, -3.0]), np.array([-0.5, -2.0])), [0.5, -1.0]
    )


def test_noise_free_controller_reaches_every_goal_from_every_umaze_cell(maze_module):
    env = gym.make("PointMaze_UMaze-v3", continuing_task=True, reset_target=False)
    maze_map = maze_module.maze_map_of("umaze")
    cells = [tuple(int(v) for v in c) for c in np.argwhere(maze_module.free_grid(maze_map))]
    expert = maze_module.ExpertPolicy(maze_map)
    worst = 0
    try:
        for k, (start, goal) in enumerate((s, g) for s in cells for g in cells):
            obs, _ = env.reset(seed=k, options={"reset_cell": np.array(start), "goal_cell": np.array(goal)})
            expert.reset()
            for t in range(1, 301):  # noqa: B007 (t is read after the loop)
                obs, _, _, trunc, info = env.step(expert(obs))
                if info["success"] or trunc:
                    break
            assert info["success"], (start, goal)
            worst = max(worst, t)
    finally:
        env.close()
    assert worst <= 200  # inside the 300-step horizon (measured: 152 steps at worst)


# --- bad input ----------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", ["local/pointmaze/huge-sparse-v0", "local/pointmaze/umaze-shaped-v0"])
def test_unknown_maze_or_variant_lists_the_ids(make_module, bad, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path / "root"))
    with pytest.raises(ValueError) as err:
        make_module.build(bad, num_steps=1_000)
    for m in MAZES:
        for v in ("sparse", "dense"):
            assert f"local/pointmaze/{m}-{v}-v0" in str(err.value)
    assert make_module.main([bad]) == 2
    assert "local/pointmaze/umaze-sparse-v0" in capsys.readouterr().err
    assert not (tmp_path / "root").exists()


def test_list_and_all_name_the_eight_maze_ids(make_module, capsys):
    assert make_module.main(["--list"]) == 0
    out = capsys.readouterr().out
    ids = [f"local/pointmaze/{m}-{v}-v0" for m in MAZES for v in ("sparse", "dense")]
    assert all(i in out for i in ids)
    assert set(ids) <= set(make_module.all_ids())


@pytest.mark.parametrize("maze,steps", [("umaze", 299), ("large", 799), ("large", 0)])
def test_too_few_steps_is_a_clear_error_and_writes_nothing(make_module, maze, steps, tmp_path, monkeypatch):
    root = tmp_path / "root"
    root.mkdir()
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(root))
    with pytest.raises(ValueError, match="num-steps"):
        make_module.build(f"local/pointmaze/{maze}-sparse-v0", num_steps=steps)
    assert listing(root) == []


def test_too_few_steps_in_write_maze_itself(maze_module, tmp_path, monkeypatch):
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path))
    with pytest.raises(ValueError, match="at least 600"):
        maze_module.write_maze("local/pointmaze/medium-dense-v0", "medium", "dense", 599, 0)
    assert listing(tmp_path) == []
    assert maze_module.check_num_steps("medium", None) == 1_000_000


def test_already_built_is_skipped_unless_forced(built, make_module, maze_module, monkeypatch, capsys):
    dataset_id = "local/pointmaze/umaze-sparse-v0"
    hdf5 = Path(os.environ["MINARI_DATASETS_PATH"]) / dataset_id / "data" / "main_data.hdf5"
    before = hdf5.stat().st_mtime_ns
    capsys.readouterr()
    make_module.build(dataset_id, num_steps=SMALL_STEPS)
    assert "already built" in capsys.readouterr().out
    assert hdf5.stat().st_mtime_ns == before
    called = []
    monkeypatch.setattr(maze_module, "write_maze", lambda *a: called.append(a) or pytest.fail("rebuilt"))
    make_module.build(dataset_id, num_steps=SMALL_STEPS)
    assert called == []


def test_interrupted_build_leaves_nothing(make_module, maze_module, tmp_path, monkeypatch):
    import minari

    root = tmp_path / "root"
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(root))
    monkeypatch.setattr(maze_module, "REF_EPISODES", REF_EPISODES)
    real = minari.create_dataset_from_buffers
    written = []

    def write_then_interrupt(*args, **kwargs):
        ds = real(*args, **kwargs)
        written.append(Path(ds.storage.data_path))
        raise KeyboardInterrupt

    monkeypatch.setattr(minari, "create_dataset_from_buffers", write_then_interrupt)
    dataset_id = "local/pointmaze/umaze-dense-v0"
    with pytest.raises(KeyboardInterrupt):
        make_module.build(dataset_id, num_steps=500)
    assert written and ".staging-" in str(written[0])  # Minari had written its files, in staging
    assert dataset_id not in minari.list_local_datasets()
    assert not (root / dataset_id).exists()
    assert not [p for p in listing(root) if "staging" in p]
    with pytest.raises(FileNotFoundError):
        minari.load_dataset(dataset_id)


def test_missing_gymnasium_robotics_names_the_package(make_module, maze_module, tmp_path, monkeypatch):
    root = tmp_path / "root"
    root.mkdir()
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(root))
    monkeypatch.setitem(sys.modules, "gymnasium_robotics", None)  # import now raises ImportError
    with pytest.raises(ImportError, match="pip install gymnasium-robotics"):
        make_module.build("local/pointmaze/open-sparse-v0", num_steps=1_000)
    assert listing(root) == []


def test_build_leaves_no_maze_xml_in_the_temp_dir(make_module, maze_module, tmp_path, monkeypatch):
    import tempfile

    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path / "root"))
    monkeypatch.setattr(maze_module, "REF_EPISODES", 1)
    sys_tmp = Path(tempfile.gettempdir())
    before = set(sys_tmp.glob("*.xml"))
    make_module.build("local/pointmaze/open-sparse-v0", num_steps=300)
    assert set(sys_tmp.glob("*.xml")) == before
    assert Path(tempfile.gettempdir()) == sys_tmp
