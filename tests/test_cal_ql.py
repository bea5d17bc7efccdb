"""Cal-QL: Monte-Carlo returns (dataset and online rows) and the calibrated bound against
hand-computed values, the mixed online batch, the presets, the file as cql.py plus the bound,
offline-to-online learning, the command line, --resume, a kill -9 in the online phase and a --sweep
grid point through both phases."""

import dataclasses
import inspect
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import serialization
from helpers import assert_policy_reloads, only_run_dir, snapshot  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "algorithms"))
import cal_ql  # noqa: E402
import cql  # noqa: E402

TINY = dict(hidden_dims=(64, 64), batch_size=64, eval_episodes=5, no_log=True)
LOG2 = math.log(2.0)


def meta_of(domain="locomotion", robot="pendulum", level="pd", **more):
    """What resolve() (and stack_trajectories) read of a dataset's Meta."""
    return SimpleNamespace(domain=domain, robot=robot, level=level, **more)


# --- Monte-Carlo returns ----------------------------------------------------------------------
def test_mc_returns_terminal_truncated_and_sparse_failure_hand_computed():
    # Four episodes in one flat array, gamma 0.5: terminal [1, 2, 3]; truncated [4, 0, 2] (not
    # bootstrapped); an all-failure sparse episode [-5, -5]; a sparse success [-5, 5].
    rewards = [1, 2, 3, 4, 0, 2, -5, -5, -5, 5]
    terminals = [0, 0, 1, 0, 0, 0, 0, 0, 0, 1]
    ends = [0, 0, 1, 0, 0, 1, 0, 1, 0, 1]
    expected = [
        1 + 0.5 * 2 + 0.25 * 3, 2 + 0.5 * 3, 3,
        4 + 0.5 * 0 + 0.25 * 2, 0 + 0.5 * 2, 2,
        -5 / (1 - 0.5), -5 / (1 - 0.5),  # r_neg / (1 - gamma) everywhere
        -5 + 0.5 * 5, 5,
    ]  # fmt: skip
    got = cal_ql.mc_returns(np.array(rewards, float), np.array(terminals, bool), np.array(ends, bool), 0.5, -5.0)
    np.testing.assert_allclose(got, expected, rtol=1e-6)
    # Dense rewards (no failure reward): the all -5 episode is an ordinary discounted sum.
    dense = cal_ql.mc_returns(np.array(rewards, float), np.array(terminals, bool), np.array(ends, bool), 0.5)
    np.testing.assert_allclose(dense[6:8], [-5 - 2.5, -5], rtol=1e-6)
    np.testing.assert_allclose(dense[:6], expected[:6], rtol=1e-6)


def test_dataset_mc_returns_follow_episode_boundaries(pendulum_dataset):
    from common.data import load_dataset

    data, meta = load_dataset(pendulum_dataset, to_device=False)
    ends = np.append(data.episode_starts[1:], True)
    g = cal_ql.mc_returns(data.rewards, data.terminals, ends, 0.99)
    last = np.flatnonzero(ends)
    np.testing.assert_allclose(g[last], data.rewards[last])  # no bootstrap past an episode's end
    first = np.append(np.flatnonzero(data.episode_starts), len(g))
    for a, b in zip(first[:-1], first[1:]):  # the forward discounted sum of each episode
        assert g[a] == pytest.approx(np.sum(data.rewards[a:b] * 0.99 ** np.arange(b - a)), rel=1e-4)
    assert len(first) - 1 == len(meta.episode_lengths)


def test_online_rows_hold_mc_returns_masks_and_true_last_observations():
    # One environment, stepped by hand through the online phase's own path (Trajectories.add, then
    # stack_trajectories): a terminated trajectory, rewards [1, 2, 3]; a truncated one, [4, 0, 2],
    # whose last observation differs from the reset one the environment returns; an unfinished one.
    meta = meta_of(obs_dim=2, action_dim=1, episode_returns=np.array([0.0, 100.0]))
    args = cal_ql.resolve(cal_ql.Args(discount=0.5), meta)
    trajectories, finished = cal_ql.Trajectories(1), []
    steps = [  # (obs, action, reward, terminated, truncated, true next obs)
        (0, 0.1, 1.0, False, False, 1), (1, 0.2, 2.0, False, False, 2), (2, 1.0, 3.0, True, False, 3),
        (10, -0.1, 4.0, False, False, 11), (11, 0.0, 0.0, False, False, 12), (12, 0.3, 2.0, False, True, 13),
        (20, 0.5, 7.0, False, False, 21),
    ]  # fmt: skip
    for o, a, r, term, trunc, o2 in steps:
        ended = trajectories.add(np.full((1, 2), o, np.float32), np.full((1, 1), a, np.float32), np.array([r]),
                                 np.array([term]), np.array([trunc]), np.full((1, 2), o2, np.float32))  # fmt: skip
        finished += [traj for i, traj in ended]
    assert len(finished) == 2 and len(trajectories.running[0]) == 1
    obs_mean, obs_std = np.array([1.0, 1.0], np.float32), np.array([2.0, 2.0], np.float32)
    rows, count = cal_ql.stack_trajectories(finished, meta, args, obs_mean, obs_std, block=10)
    assert count == 6 and rows.rewards.shape == (10,)
    expected_g = [1 + 0.5 * 2 + 0.25 * 3, 2 + 0.5 * 3, 3, 4 + 0.5 * 0 + 0.25 * 2, 0 + 0.5 * 2, 2]
    np.testing.assert_allclose(rows.mc_returns[:6], expected_g, rtol=1e-6)  # no bootstrap at the truncation
    np.testing.assert_allclose(rows.rewards[:6], [1, 2, 3, 4, 0, 2])  # rewards as they are (dense preset)
    np.testing.assert_array_equal(rows.masks[:6], [1, 1, 0, 1, 1, 1])  # only the terminal stops bootstrapping
    np.testing.assert_allclose(rows.next_observations[:6, 0], (np.array([1, 2, 3, 11, 12, 13]) - 1) / 2)
    np.testing.assert_allclose(rows.observations[:6, 0], (np.array([0, 1, 2, 10, 11, 12]) - 1) / 2)
    assert rows.actions[2, 0] == np.float32(cal_ql.ACTION_CLIP)  # clipped like the dataset's actions
    assert not np.any(rows.mc_returns[6:]) and not np.any(rows.observations[6:])  # zero padding


def test_running_trajectories_are_rebuilt_by_replaying_the_environments(pendulum_dataset):
    from common.data import load_dataset
    from common.evaluation import OnlineEnvs

    _, meta = load_dataset(pendulum_dataset, to_device=False)
    envs, live = OnlineEnvs(meta, [5, 6]), cal_ql.Trajectories(2)
    obs, rng, ended = envs.reset(), np.random.default_rng(0), 0
    for _ in range(40):
        actions = rng.uniform(-1, 1, (2, 1)).astype(np.float32)
        next_obs, reward, term, trunc, true_next = envs.step(actions)
        ended += len(live.add(obs, actions, reward, term, trunc, true_next))
        obs = next_obs
    assert ended > 0 and all(live.running)  # episodes ended, and both environments are mid-episode
    rebuilt = cal_ql.Trajectories(2)
    resumed = OnlineEnvs(meta, [5, 6]).restore(envs.state(), on_step=rebuilt.add)
    np.testing.assert_array_equal(resumed, obs)
    for a, b in zip(live.running, rebuilt.running):
        assert len(a) == len(b)
        for step_a, step_b in zip(a, b):
            for x, y in zip(step_a, step_b):
                np.testing.assert_array_equal(x, y)


# --- the calibrated bound ---------------------------------------------------------------------
# One state, two critics, N = 2 sampled actions per proposal, |A| = 1, MC return 0.8.
Q_DATA = [[0.3], [0.5]]
Q_RAND = [[[0.2, -0.3]], [[0.0, 1.1]]]
Q_NEXT = [[[1.5, 0.7]], [[0.4, 0.9]]]
Q_CUR = [[[2.0, -1.0]], [[1.2, 0.6]]]
LOGP_NEXT = [[0.3, -0.2]]
LOGP_CUR = [[0.1, 0.6]]
MC = [0.8]


def calibrated_gap(enabled=1.0, q_cur=Q_CUR):
    q_pi = cal_ql.calibrate(jnp.concatenate([jnp.array(Q_NEXT), jnp.array(q_cur)], -1), jnp.array(MC), enabled)
    gap, _ = cal_ql.cql_penalty(
        jnp.array(Q_DATA), jnp.array(Q_RAND), q_pi[..., :2], q_pi[..., 2:], jnp.array(LOGP_NEXT),
        jnp.array(LOGP_CUR), 1, 1.0, -jnp.inf, jnp.inf,
    )  # fmt: skip
    return gap


def lse(values):
    return math.log(sum(math.exp(v) for v in values))


def test_bound_lifts_only_policy_actions_below_the_mc_return():
    q = jnp.array([[[1.5, 0.7, 2.0, -1.0]], [[0.4, 0.9, 1.2, 0.6]]])
    np.testing.assert_allclose(cal_ql.calibrate(q, jnp.array(MC)), [[[1.5, 0.8, 2.0, 0.8]], [[0.8, 0.9, 1.2, 0.8]]])
    # In the penalty: policy terms below 0.8 become 0.8 before -log pi; uniform (0.2, -0.3, 0.0 < 0.8)
    # and data terms (0.3, 0.5 < 0.8) stay as they are.
    x1 = [0.2 + LOG2, -0.3 + LOG2, 1.5 - 0.3, 0.8 + 0.2, 2.0 - 0.1, 0.8 - 0.6]
    x2 = [0.0 + LOG2, 1.1 + LOG2, 0.8 - 0.3, 0.9 + 0.2, 1.2 - 0.1, 0.8 - 0.6]
    np.testing.assert_allclose(calibrated_gap(), [lse(x1) - 0.3, lse(x2) - 0.5], rtol=1e-5)
    # --no-calibrate: plain CQL
    y1 = [0.2 + LOG2, -0.3 + LOG2, 1.5 - 0.3, 0.7 + 0.2, 2.0 - 0.1, -1.0 - 0.6]
    y2 = [0.0 + LOG2, 1.1 + LOG2, 0.4 - 0.3, 0.9 + 0.2, 1.2 - 0.1, 0.6 - 0.6]
    np.testing.assert_allclose(calibrated_gap(0.0), [lse(y1) - 0.3, lse(y2) - 0.5], rtol=1e-5)


def test_bound_stops_the_push_down_only_where_q_is_below_the_bound():
    # d gap / d Q(s, a_cur): zero where Q < MC (the bound holds it), positive elsewhere.
    grad = jax.grad(lambda q: calibrated_gap(q_cur=q).sum())(jnp.array(Q_CUR))
    assert float(grad[0, 0, 1]) == 0.0 and float(grad[1, 0, 1]) == 0.0  # -1.0 and 0.6 < 0.8
    assert float(grad[0, 0, 0]) > 0 and float(grad[1, 0, 0]) > 0  # 2.0 and 1.2 > 0.8


# --- online batches ---------------------------------------------------------------------------
def rows(value, n):
    return cal_ql.Batch(*(jnp.full((n,) + s, value, jnp.float32) for s in [(3,), (2,), (), (3,), (), ()]))


def test_mixed_batch_draws_offline_until_online_rows_exist():
    offline, online = rows(1.0, 50), rows(2.0, 40)
    online = online._replace(rewards=online.rewards.at[5:].set(-99.0))  # rows past n_online are never used
    batch = cal_ql.sample_mixed((offline, online, jnp.int32(0)), jax.random.key(0), 64, 0.5)
    assert batch.rewards.shape == (64,) and np.all(np.asarray(batch.rewards) == 1.0)
    batch = cal_ql.sample_mixed((offline, online, jnp.int32(5)), jax.random.key(0), 64, 0.5)
    np.testing.assert_array_equal(batch.rewards, [1.0] * 32 + [2.0] * 32)


@pytest.mark.parametrize("mixing_ratio, batch_size, online_rows", [(0.5, 256, 128), (0.25, 64, 48), (0.3, 33, 24)])
def test_mixed_batch_holds_the_stated_ratio(mixing_ratio, batch_size, online_rows):
    # Online rows marked by reward -1, offline by +1: int(mixing_ratio * B) offline rows (as the
    # official code counts them), the rest online.
    offline, online = rows(1.0, 1000), rows(-1.0, 500)
    for seed in range(3):
        batch = cal_ql.sample_mixed((offline, online, jnp.int32(300)), jax.random.key(seed), batch_size, mixing_ratio)
        assert batch.rewards.shape == (batch_size,) and int((batch.rewards == -1.0).sum()) == online_rows


# --- presets and the template -----------------------------------------------------------------
def test_presets_dense_rewards_as_they_are_and_flags_win():
    def resolved(robot, level, domain="locomotion", **flags):
        return cal_ql.resolve(cal_ql.Args(**flags), meta_of(domain, robot, level))

    for robot, level in [("hopper", "medium"), ("walker2d", "medium"), ("halfcheetah", "medium-replay")]:
        args = resolved(robot, level)
        assert not args.normalize_rewards and (args.reward_scale, args.reward_bias) == (1.0, 0.0)
        assert (args.cql_alpha, args.cql_lagrange, args.max_target_backup) == (10.0, False, False)
        assert not args.sparse_rewards
    assert cql.resolve(cql.Args(), meta_of("locomotion", "hopper", "medium")).normalize_rewards  # CQL's differs
    assert resolved("hopper", "medium", normalize_rewards=True).normalize_rewards  # a flag always wins
    maze = resolved("antmaze", "umaze", "antmaze")  # the official scripts/run_antmaze.sh
    assert (maze.hidden_dims, maze.critic_hidden_dims) == ((256, 256), (256,) * 4)
    assert (maze.cql_alpha, maze.cql_lagrange, maze.target_action_gap, maze.max_target_backup) == (5.0, True, 0.8, True)
    assert (maze.reward_scale, maze.reward_bias, maze.sparse_rewards, maze.cql_clip_diff_min) == (10, -5, True, -np.inf)
    assert maze.eval_episodes == 100 and resolved("hopper", "medium").eval_episodes == 10


def test_cal_ql_is_cql_plus_the_bound():
    # The presets are cql.py's except what the module docstring lists: rewards as they are on every
    # dataset, and AntMaze's official sizes and unclipped gap.
    assert cal_ql.DATASET_PRESETS == {}
    for domain, theirs in cql.PRESETS.items():
        ours = {k: v for k, v in cal_ql.PRESETS[domain].items() if k != "sparse_rewards"}
        if domain == "antmaze":
            theirs = {**theirs, "hidden_dims": (256, 256), "critic_hidden_dims": (256,) * 4,
                      "cql_clip_diff_min": -float("inf")}  # fmt: skip
        assert ours == theirs, domain
    # Flags: cql.py's in cql.py's order, plus Cal-QL's own.
    own = {"online_steps", "calibrate", "sparse_rewards", "failure_reward", "mixing_ratio", "utd_ratio",
           "collect_steps"}  # fmt: skip
    ours = [f.name for f in dataclasses.fields(cal_ql.Args) if f.name not in own]
    assert ours == [f.name for f in dataclasses.fields(cql.Args)]
    # What both algorithms do is the same code, word for word.
    same = ["MLP", "Critics", "Actor", "tanh_gaussian_log_prob", "sample_actions", "q_multi", "TrainState",
            "Proposals", "cql_penalty", "alpha_prime_of", "actor_loss", "temperature_loss", "lagrange_loss",
            "make_agent", "process_rewards", "sample_batch", "make_train_chunk", "resolve"]  # fmt: skip
    for name in same:
        assert inspect.getsource(getattr(cal_ql, name)) == inspect.getsource(getattr(cql, name)), name
    assert cal_ql.Hyper._fields == cql.Hyper._fields + ("calibrate",)
    assert cal_ql.Batch._fields == cql.Batch._fields + ("mc_returns",)


@pytest.mark.parametrize(
    "flags, named",
    [(dict(mixing_ratio=1.5), "--mixing-ratio"), (dict(utd_ratio=0), "--utd-ratio"),
     (dict(collect_steps=0), "--collect-steps"), (dict(cql_n_actions=0), "--cql-n-actions")],
)  # fmt: skip
def test_bad_flags_are_refused_with_the_flag_named(flags, named):
    from common.data import UserError

    cal_ql.validate(cal_ql.Args())  # the defaults pass
    with pytest.raises(UserError, match=named):
        cal_ql.validate(cal_ql.Args(**flags))


# --- offline to online and the command line ---------------------------------------------------
# The short run: a faster actor than the dense preset's 3e-5 and gamma 0.9, so that the critic
# reaches the Monte-Carlo bound (<= 10) within the 1000 updates (with 0.99, MC returns up to 63 hold
# the bound active on every policy action for longer than that and the policy is still poor at 1000
# updates). The pendulum's rewards stay as they are (the dense preset).
OFFLINE_STEPS, ONLINE_STEPS = 1000, 200
TRAIN_FLAGS = dict(policy_lr=1e-3, discount=0.9)


@pytest.fixture(scope="module")
def o2o_run(pendulum_dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("calql")
    args = cal_ql.Args(dataset=pendulum_dataset, out_dir=str(out), seed=0, num_seeds=2,
                       total_steps=OFFLINE_STEPS, online_steps=ONLINE_STEPS, eval_every=OFFLINE_STEPS // 2,
                       **TRAIN_FLAGS, **TINY)  # fmt: skip
    return cal_ql.train(args)


def test_offline_phase_learns_and_beats_random(o2o_run, pendulum_dataset):
    from common.data import load_dataset

    _, meta = load_dataset(pendulum_dataset, to_device=False)
    final_offline = o2o_run["final_offline"]
    assert final_offline["step"] == OFFLINE_STEPS
    assert final_offline["normalized_mean"] >= 0.0 + 10  # ref_min_score is the random policy's return
    last_offline = [e for e in o2o_run["evaluations"] if e["phase"] == "offline"][-1]
    assert np.mean(last_offline["returns"]) >= 0.25 * meta.episode_returns.mean()


def test_offline_to_online_logs_both_phases(o2o_run):
    phases = [(e["phase"], e["step"]) for e in o2o_run["evaluations"]]
    assert phases == [("offline", OFFLINE_STEPS // 2), ("offline", OFFLINE_STEPS), ("online", ONLINE_STEPS)]
    assert o2o_run["final"]["step"] == ONLINE_STEPS and o2o_run["online_steps"] == ONLINE_STEPS
    assert np.isfinite(o2o_run["final"]["normalized_mean"]) and o2o_run["seeds"] == [0, 1]


# A tiny run with four online evaluations, so that a kill lands inside the online phase.
CLI_FLAGS = ["--total-steps", 200, "--online-steps", 400, "--eval-every", 100, "--num-seeds", 2, "--hidden-dims",
             32, 32, "--batch-size", 32, "--eval-episodes", 2, "--cql-n-actions", 2, "--policy-lr", 1e-3]  # fmt: skip
CLI_PHASES = [("offline", 100), ("offline", 200), ("online", 100), ("online", 200), ("online", 300), ("online", 400)]


def command(*flags):
    return [sys.executable, str(REPO / "algorithms" / "cal_ql.py"), *map(str, flags)]


ENV = {**os.environ, "PYTHONPATH": str(REPO)}  # MINARI_DATASETS_PATH and the compilation cache: the conftest's


def run_cli(*flags, cwd):
    return subprocess.run(command(*flags), capture_output=True, text=True, cwd=cwd, env=ENV, timeout=300)


files_of = snapshot


def evaluations(run_dir: Path) -> list:
    record = json.loads((run_dir / "record.json").read_text())
    return [(e["phase"], e["step"], e["returns"]) for e in record["evaluations"]]


@pytest.fixture(scope="module")
def cli_run(pendulum_dataset, tmp_path_factory):
    """The uninterrupted command line run."""
    out = tmp_path_factory.mktemp("calql_cli")
    proc = run_cli("--dataset", pendulum_dataset, *CLI_FLAGS, "--out-dir", out, cwd=out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run_dir,) = [p for p in (out / "cal_ql").iterdir() if p.is_dir()]
    return proc, run_dir


def test_cli_smoke(cli_run):
    proc, run_dir = cli_run
    assert proc.stdout.splitlines()[0] == f"run directory: {run_dir}"
    assert "normalize_rewards False" in proc.stdout  # the resolved preset is printed
    record = json.loads((run_dir / "record.json").read_text())
    assert record["algorithm"] == "cal_ql" and record["tier"] == "short" and record["finished"]
    assert [(e["phase"], e["step"]) for e in record["evaluations"]] == CLI_PHASES
    assert record["final_offline"]["step"] == 200 and record["final"]["step"] == 400


def test_kill_during_the_online_phase_then_resume_alone_equals_the_uninterrupted_run(
    cli_run, pendulum_dataset, tmp_path
):
    log = open(tmp_path / "killed.log", "w")
    proc = subprocess.Popen(command("--dataset", pendulum_dataset, *CLI_FLAGS, "--out-dir", tmp_path),
                            stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path, env=ENV)  # fmt: skip
    try:
        deadline, found = time.time() + 300, []
        while time.time() < deadline and proc.poll() is None:
            found = list(tmp_path.glob("cal_ql/*/record.json"))
            if found and any(e[0] == "online" for e in evaluations(found[0].parent)):
                break
            time.sleep(0.02)
        assert proc.poll() is None, "the run ended before the kill: " + (tmp_path / "killed.log").read_text()[-2000:]
        os.kill(proc.pid, signal.SIGKILL)  # right after the first online checkpoint: inside the online phase
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
        log.close()
    run_dir = found[0].parent
    killed = json.loads((run_dir / "record.json").read_text())
    assert not killed["finished"] and len(killed["evaluations"]) < len(CLI_PHASES)
    proc = run_cli("--resume", run_dir, cwd=tmp_path)  # alone: everything else comes from config.json
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "(online)" in proc.stdout  # resumed inside the online phase
    record = json.loads((run_dir / "record.json").read_text())
    assert record["dataset"] == pendulum_dataset and record["finished"]
    assert evaluations(run_dir) == evaluations(cli_run[1])  # number for number


def test_resume_extends_the_online_phase(cli_run, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(cli_run[1], run_dir)
    proc = run_cli("--resume", run_dir, "--online-steps", 500, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = json.loads((run_dir / "record.json").read_text())
    assert [(e["phase"], e["step"]) for e in record["evaluations"]] == CLI_PHASES + [("online", 500)]
    assert evaluations(run_dir)[:-1] == evaluations(cli_run[1]) and record["online_steps"] == 500


def test_resume_with_a_different_flag_is_refused_before_loading(cli_run, tmp_path):
    _, run_dir = cli_run
    before = files_of(run_dir)
    t0 = time.time()
    proc = run_cli("--resume", run_dir, "--hidden-dims", 64, 64, cwd=tmp_path)
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "--hidden-dims" in lines[0] and "32" in lines[0] and "Traceback" not in proc.stderr
    assert "run directory" not in proc.stdout and time.time() - t0 < 60  # refused before the dataset loads
    assert files_of(run_dir) == before and sorted(p.name for p in run_dir.parent.iterdir()) == [run_dir.name]


def test_bad_flag_on_the_command_line_is_one_line_and_leaves_no_folder(tmp_path):
    proc = run_cli("--mixing-ratio", 1.5, "--out-dir", tmp_path / "runs", cwd=tmp_path)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == ["error: --mixing-ratio must be in [0, 1], got 1.5"]
    assert not (tmp_path / "runs").exists()


def test_finished_run_resumed_without_a_larger_budget_changes_nothing(cli_run, tmp_path):
    _, run_dir = cli_run
    before = files_of(run_dir)
    proc = run_cli("--resume", run_dir, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "finished" in proc.stdout
    assert files_of(run_dir) == before


def test_policy_reloads_from_the_run_directory(cli_run):
    """`load_policy` (what --eval-only uses) rebuilds the policy and reproduces the last evaluation."""
    assert_policy_reloads(cli_run[1])


def checkpoint_of(out: Path) -> dict:
    """The one run's checkpoint under `out`, as saved (state and online buffer: member axis first)."""
    return serialization.msgpack_restore((only_run_dir(out, "cal_ql") / "checkpoint.msgpack").read_bytes())


def test_sweep_grid_point_equals_the_plain_run_with_its_value_offline_and_online(pendulum_dataset, tmp_path):
    """--sweep cql_alpha=1,5 (the member axis, common/members.py) with one seed, offline then online:
    point 1's member (its environment, online rows and state) ends as seed 0 of the plain run with
    cql_alpha 5 does, point 0's elsewhere. Both runs have o2o_run's shapes (two members, offline
    chunks of OFFLINE_STEPS // 2, online rounds of the time limit): its compiled programs."""
    flags = dict(dataset=pendulum_dataset, total_steps=OFFLINE_STEPS // 2, online_steps=100,
                 eval_every=OFFLINE_STEPS // 2, **TINY)  # fmt: skip
    record = cal_ql.train(cal_ql.Args(out_dir=str(tmp_path / "sweep"), num_seeds=1, sweep=("cql_alpha=1,5",), **flags))
    cal_ql.train(cal_ql.Args(out_dir=str(tmp_path / "plain"), num_seeds=2, cql_alpha=5.0, **flags))
    swept, alone = checkpoint_of(tmp_path / "sweep"), checkpoint_of(tmp_path / "plain")
    assert swept["phase"] == alone["phase"] == "online"
    n = int(alone["online"]["n_online"][0])
    assert n > 0 and int(swept["online"]["n_online"][1]) == n  # the same environment, the same rows
    for name, rows in alone["online"]["buffer"].items():
        np.testing.assert_allclose(swept["online"]["buffer"][name][1, :n], rows[0, :n], atol=2e-4, rtol=2e-3)
    leaves = jax.tree_util.tree_leaves(swept["state"])
    for a, b in zip(leaves, jax.tree_util.tree_leaves(alone["state"])):
        np.testing.assert_allclose(np.asarray(a)[1], np.asarray(b)[0], atol=2e-4, rtol=2e-3)
    assert not all(np.allclose(a[0], a[1]) for a in leaves)  # point 0 trained with its own alpha
    assert [p["point"] for p in record["final_per_point"]] == [{"cql_alpha": 1.0}, {"cql_alpha": 5.0}]
    assert [(e["phase"], np.shape(e["normalized"])) for e in record["evaluations"]] == [
        ("offline", (2, 5)), ("online", (2, 5))
    ]  # fmt: skip
