#!/usr/bin/env bash
# The GPU checks of the "Scale" issue as one command that fits a lent GPU machine's 10-minute call.
# Most important first; each step is time-boxed, and its results land in OUT as soon as it ends, so
# a call stopped at its limit still returns what the finished steps made:
#   1. 1M IQL updates x 5 seeds on local/hopper/medium-v0 (a 200k-transition build: the update's
#      speed does not depend on the dataset's size), evaluated every 100k updates: the wall time,
#      evaluation included (target: under 5 minutes).
#   2. IQL's 3 x 3 sweep (expectile 0.6,0.7,0.8 x beta 1,3,10) x 5 seeds against one seed, 100k
#      updates each, evaluated every 50k: both wall times (target: the sweep under 3x the seed's).
#   3. results/benchmark.py --eval: evaluation's episodes and env steps/s for 1, 5 and 45 members x 4
#      hopper episodes, in the training process and in worker processes (the host's cores).
#   4. results/benchmark.py --algo iql, cql, dt: updates/s for 1, 4 and 16 seeds and a 3 x 3 sweep,
#      FLOPs per update, the measured matmul peak (files for results/throughput/).
# OUT ends with (DEVICE: the GPU's name, e.g. NVIDIA-H200), named as results/throughput/ keeps them:
# gpu_checks__DEVICE.log, gpu_checks__DEVICE.json (the wall times, device and versions, made by this
# script and rewritten after each run), gpu_iql_1M_x5__DEVICE.json, gpu_iql_one_seed__DEVICE.json and
# gpu_iql_sweep_x5__DEVICE.json (the runs' records, each copied as soon as its run ends), eval__DEVICE.json
# and one benchmark file per algorithm. Nothing here is a score of the grid: step 1's dataset is not a
# full build. Times seen on an H200 (4 December, before evaluation stepped only running episodes and
# used worker processes): wheels 5 s, dataset 39 s, step 1 332 s, one seed 30 s, the sweep over 180 s,
# step 4 46 s (iql), 79 s (cql), over 100 s (dt). Steps 1-2 take one 10-minute call, steps 3-4 another,
# at once, on the still-warm machine (its dataset is kept; a bare machine builds it again).
#
#   bash results/gpu_checks.sh OUT              # from the repository root, on an idle machine
#   ONLY="3 4" bash results/gpu_checks.sh OUT   # only some steps (a second call after a stopped one)
#   ONLY="4" ALGOS="cql dt" bash results/gpu_checks.sh OUT   # only some of step 4's benchmarks
#
# On a machine with JAX for CUDA, flax and optax but not this project's other packages (the device
# tool's H200 image: Python 3.12, no gymnasium, minari, mujoco or tyro), download their wheels where
# pip works, from the repository root (the versions this repository was tested with), and set WHEELS:
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
#     -d .whl gymnasium==1.4.0 farama-notifications==0.0.6 minari==0.5.4 mujoco==4.0.0 \
#     mujoco-core==4.0.0 glfw==2.11.0 pyopengl==3.1.10 tyro==1.0.17 typeguard==4.6.1 docstring-parser==0.18.0
#   WHEELS=.whl bash results/gpu_checks.sh OUT   # installs them with --no-deps into /tmp/site first
# (14 MB; mujoco-studio, mujoco's viewer, is not needed and not imported.)
set -uo pipefail
OUT="${1:?usage: bash results/gpu_checks.sh OUT}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
cd "$(dirname "$0")/.."
WORK="$(mktemp -d)"
# the dataset outlives the call: a second call on the still-warm machine finds it built (a bare one builds it)
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 MINARI_DATASETS_PATH=/tmp/jaxorl-gpu-checks/minari
export MUJOCO_GL="${MUJOCO_GL:-disable}"   # nothing renders; the H200 image has no EGL library
PY="${PYTHON:-python3}"
STEPS_1M="${STEPS_1M:-1000000}"   # smaller values only to try the script itself on a CPU
STEPS_SWEEP="${STEPS_SWEEP:-100000}"
ONLY=" ${ONLY:-1 2 3 4} "
BENCH_FLAGS="${BENCH_FLAGS:-}"   # e.g. "--updates 20 --chunk 10 --seeds 1 --sweep-seeds 0" on a CPU
DEV="$("$PY" -c "import jax; print(jax.devices()[0].device_kind.replace(' ', '-').replace('/', '-'))" 2> /dev/null)"
exec > >(tee -a "$OUT/gpu_checks__${DEV:-unknown}.log") 2>&1

log() { echo "[gpu_checks $(date +%T)] $*"; }
if [ -n "${WHEELS:-}" ]; then
  log "installing $(ls "$WHEELS"/*.whl | wc -l) wheels from $WHEELS into /tmp/site"
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    "$WHEELS"/*.whl || exit 1
  export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
"$PY" -c "import jax, flax, optax, gymnasium, minari, mujoco, tyro; print('jax', jax.__version__, jax.devices())" ||
  exit 1
command -v nvidia-smi > /dev/null && nvidia-smi -L

now() { date +%s.%N; }
declare -A WALL
# run NAME LIMIT_S COMMAND...: time-boxed, wall time kept in WALL[NAME] (empty if it failed or timed out)
run() {
  local name=$1 limit=$2 t0 rc
  shift 2
  log "$name: $*"
  t0=$(now)
  timeout --signal=INT --kill-after=20 "$limit" "$@"
  rc=$?
  if [ "$rc" -eq 0 ]; then
    WALL[$name]=$(awk "BEGIN { printf \"%.1f\", $(now) - $t0 }")
    log "$name: done in ${WALL[$name]} s"
  else
    log "$name: failed or stopped (exit $rc)"
  fi
}
# keep NAME: the record of run NAME, copied to OUT as gpu_iql_NAME__DEV.json, then the summary rewritten
keep() {
  local r
  r=$(find "$WORK/runs/$1" -name record.json 2> /dev/null | head -1)
  [ -n "$r" ] && cp "$r" "$OUT/gpu_iql_$1__$DEV.json"
  summary > /dev/null
}
summary() {
  "$PY" - "$OUT/gpu_checks__$DEV.json" "${WALL[iql_1M_x5]:-}" "${WALL[iql_sweep_x5]:-}" "${WALL[iql_one_seed]:-}" \
    "$STEPS_1M" "$STEPS_SWEEP" << 'EOF'
import json, subprocess, sys, time, jax
path, one_m, sweep, single, steps_1m, steps_sweep = sys.argv[1:]
f = lambda s: round(float(s), 1) if s else None
commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
out = {"device": jax.devices()[0].device_kind, "jax_version": jax.__version__, "date": time.strftime("%Y-%m-%d"),
       "commit": commit or None, "iql_1M_x5": {"updates": int(steps_1m), "seeds": 5, "wall_s": f(one_m)},
       "iql_sweep": {"updates": int(steps_sweep), "members": 45, "wall_s": f(sweep), "one_seed_wall_s": f(single)}}
if sweep and single:
    out["iql_sweep"]["ratio"] = round(float(sweep) / float(single), 2)
json.dump(out, open(path, "w"), indent=1)
print(json.dumps(out))
EOF
}

# 1. 1M IQL updates x 5 seeds, evaluation included (steps 1, 2 and 3 share the dataset)
[[ "$ONLY" == *" 1 "* || "$ONLY" == *" 2 "* || "$ONLY" == *" 3 "* ]] &&
  run dataset 240 "$PY" datasets/make.py local/hopper/medium-v0 --num-steps 200000
if [[ "$ONLY" == *" 1 "* ]]; then
  run iql_1M_x5 480 "$PY" algorithms/iql.py --dataset local/hopper/medium-v0 --num-seeds 5 \
    --total-steps "$STEPS_1M" --eval-every $((STEPS_1M / 10)) --out-dir "$WORK/runs/1M_x5"
  keep 1M_x5
fi

# 2. a 3 x 3 sweep x 5 seeds against one seed
if [[ "$ONLY" == *" 2 "* ]]; then
  run iql_one_seed 240 "$PY" algorithms/iql.py --dataset local/hopper/medium-v0 --num-seeds 1 \
    --total-steps "$STEPS_SWEEP" --eval-every $((STEPS_SWEEP / 2)) --out-dir "$WORK/runs/one_seed"
  keep one_seed
  run iql_sweep_x5 300 "$PY" algorithms/iql.py --dataset local/hopper/medium-v0 --num-seeds 5 \
    --sweep expectile=0.6,0.7,0.8 beta=1,3,10 \
    --total-steps "$STEPS_SWEEP" --eval-every $((STEPS_SWEEP / 2)) --out-dir "$WORK/runs/sweep_x5"
  keep sweep_x5
  summary
fi

# 3. evaluation speed, 4. update throughput (each writes results/throughput/NAME__DEVICE.json; copied to OUT)
touch "$WORK/before_benchmarks"
if [[ "$ONLY" == *" 3 "* ]]; then
  run bench_eval 240 "$PY" results/benchmark.py --eval --eval-members 1 5 45 --eval-episodes 4
  find results/throughput -name "eval__*.json" -newer "$WORK/before_benchmarks" -exec cp {} "$OUT/" \;
fi
[[ "$ONLY" == *" 4 "* ]] && for algo in ${ALGOS:-iql cql dt}; do
  # shellcheck disable=SC2086
  run "bench_$algo" 240 "$PY" results/benchmark.py --algo "$algo" $BENCH_FLAGS
  find results/throughput -name "${algo}__*.json" -newer "$WORK/before_benchmarks" -exec cp {} "$OUT/" \;
done
log "finished; $OUT holds: $(ls "$OUT" | tr '\n' ' ')"
