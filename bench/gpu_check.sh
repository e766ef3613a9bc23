#!/usr/bin/env bash
# The GPU check of unet-cuda: one run of a few minutes on the GPU machine (shared/docs/GPU.md).
#
#   bash bench/gpu_check.sh OUTDIR
#
# Stages, each under its own time limit and logged to OUTDIR/<stage>.log; a stage that fails or
# times out is recorded in OUTDIR/stages.tsv and the script goes on:
#   info        commit (full hash, dirty or not), date, GPU name, clocks and driver (nvidia-smi)
#   build       pip install -e . for this GPU's architecture only, with every core
#   env         versions and settings (CuPy, CUDA, PyTorch, cuDNN, TF32 defaults)
#   gpu-tests   pytest -m gpu (JUnit XML in OUTDIR/gpu-tests.xml)
#   profile-*   one training step of the paper's network op by op, in tf32, bf16 and fp32
#               (python -m unet_cuda.profile -> OUTDIR/profile-<precision>.json), tf32 again
#               with the GEMM plans measured (--autotune -> OUTDIR/profile-tf32-autotuned.json),
#               and with v7_tf32_halo, v8_bf16_halo and v9_fp32_halo (--kernel -> OUTDIR/profile-<version>.json)
#   sanitizer-* compute-sanitizer memcheck, racecheck, initcheck, synccheck over
#               bench/sanitizer_driver.py (every op once on small awkward shapes)
#   bench       the benchmarks: pytest bench/ with pytest-benchmark JSON in OUTDIR/benchmarks.json
#   ncu         Nsight Compute over bench/ncu_driver.py (the GEMM kernels of three conv3x3 layers and
#               one up-convolution, each precision's version): OUTDIR/ncu-details.csv, ncu-cases.json,
#               and every collected metric in OUTDIR/ncu-raw.csv (the results JSON keeps each kernel's
#               stall reasons from it)
#   isbi        (only when named in GPU_CHECK_STAGES and ISBI_DIR is set) trains the paper's network
#               on ISBI 2012 for ISBI_MINUTES (default 3) with bench/isbi_run.py -> OUTDIR/isbi.json
#   collect     bench/collect_results.py writes OUTDIR/results-<commit>-<gpu>.json and prints the
#               short table, last
#
# Environment (all optional):
#   GPU_CHECK_BUDGET   seconds the whole run may take (default 540); each stage's limit is cut to
#                      what is left, and stages that no longer fit are skipped and recorded so
#   GPU_CHECK_STAGES   comma-separated subset of: build,gpu-tests,profile,sanitizer,bench,ncu,isbi
#                      (default: build,gpu-tests,profile,sanitizer,bench,ncu)
#   GPU_TESTS_WORKERS  pytest-xdist workers for gpu-tests where xdist is installed (default 6; 0: one
#                      process). The NumPy references dominate their time, and they run on the CPU
#   GPU_TESTS_LIMIT    seconds for gpu-tests (default 240)
#   PROFILE_PRECISIONS the precisions of the profile stage (default "tf32 bf16 fp32")
#   PROFILE_AUTOTUNE_PRECISIONS  those profiled again with --autotune (default "tf32"; "" for none)
#   PROFILE_KERNELS    3x3 kernel versions profiled by name (profile --kernel; default
#                      "v7_tf32_halo v8_bf16_halo v9_fp32_halo"; "" for none): OUTDIR/profile-<version>.json
#   SANITIZER_LIMIT    seconds for the four sanitizers together (default 240; each at most 90)
#   SANITIZER_TOOLS    the sanitizers to run, of "memcheck racecheck initcheck synccheck" (default:
#                      all four; racecheck takes the longest, over a minute on an H100)
#   BENCH_LIMIT        seconds for the bench stage (default 420, or what the budget leaves)
#   NCU_LIMIT          seconds for the ncu stage (default 150)
#   ISBI_DIR           folder with train-volume.tif and train-labels.tif, for the isbi stage
#   ISBI_MINUTES       training minutes of the isbi stage (default 3; "auto": what the budget leaves
#                      after 60 s for start-up and the final validation)
#   UNET_CUDA_ARCH     CUDA architectures to build (default: this GPU's, from nvidia-smi)
#   UNET_BENCH_SCALE   multiplies the benchmarks' time budgets (default 1)
#   GPU_CHECK_COMMIT   the full hash the checkout was copied from: recorded in place of what git says
#                      (a copied tree may come with a stale .git); dirty is then unknown (null)
#
# The results JSON is written into OUTDIR only; copying it to bench/results/ is done by hand.

set -uo pipefail

if [[ $# -ne 1 || "$1" == -* ]]; then
  echo "usage: bash bench/gpu_check.sh OUTDIR" >&2
  exit 2
fi

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd -P)"
OUTDIR="$(realpath -m "$1")"
case "$OUTDIR/" in
  "$ROOT/bench/results/"*)
    echo "gpu_check: the output folder must not be bench/results (the JSON is copied there by hand)" >&2
    exit 2 ;;
esac
mkdir -p "$OUTDIR" || { echo "gpu_check: cannot create $OUTDIR" >&2; exit 2; }
cd "$ROOT" || exit 2

PY="${PYTHON:-python3}"
BUDGET="${GPU_CHECK_BUDGET:-540}"
STAGES="${GPU_CHECK_STAGES:-build,gpu-tests,profile,sanitizer,bench,ncu}"
RESERVE=25                       # seconds kept back for collect and the table
START=$(date +%s)
DEADLINE=$((START + BUDGET))
: > "$OUTDIR/stages.tsv"

log() { printf '[gpu_check %3ds] %s\n' "$(( $(date +%s) - START ))" "$*"; }

wanted() { [[ ",$STAGES," == *",$1,"* ]]; }

# record NAME RC SECONDS LIMIT NOTE
record() { printf '%s\t%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" "${5:-}" >> "$OUTDIR/stages.tsv"; }

# run_stage NAME LIMIT_SECONDS COMMAND...   (output to OUTDIR/NAME.log)
run_stage() {
  local name=$1 limit=$2; shift 2
  local left=$(( DEADLINE - $(date +%s) - RESERVE ))
  if (( left < 10 )); then
    record "$name" skipped 0 0 "no time left in the ${BUDGET} s budget"
    log "$name: skipped, no time left"
    return 0
  fi
  (( limit > left )) && limit=$left
  log "$name: start (limit ${limit} s)"
  local t0; t0=$(date +%s)
  timeout --kill-after=10 "$limit" "$@" > "$OUTDIR/$name.log" 2>&1
  local rc=$?
  local secs=$(( $(date +%s) - t0 ))
  local note=""
  (( rc == 124 || rc == 137 )) && note="timed out after ${limit} s"
  record "$name" "$rc" "$secs" "$limit" "$note"
  log "$name: rc=$rc in ${secs} s${note:+ ($note)}"
  return 0
}

skip_stage() { record "$1" skipped 0 0 "$2"; log "$1: skipped ($2)"; }

# ---------------------------------------------------------------------------------------------
# info: commit, date, GPU
# ---------------------------------------------------------------------------------------------
GPU_FIELDS="name,driver_version,pci.bus_id,memory.total,compute_cap,clocks.sm,clocks.max.sm,clocks.mem,clocks.max.mem,power.limit,temperature.gpu,pstate,persistence_mode"

gpu_info() {  # gpu_info FILE: the fields above, or the two that every driver knows
  local file=$1
  if nvidia-smi --query-gpu="$GPU_FIELDS" --format=csv,noheader,nounits > "$file.tmp" 2>>"$OUTDIR/info.log"; then
    { echo "# $GPU_FIELDS"; cat "$file.tmp"; } > "$file"
  elif nvidia-smi --query-gpu=name,driver_version --format=csv,noheader,nounits > "$file.tmp" 2>>"$OUTDIR/info.log"; then
    { echo "# name,driver_version"; cat "$file.tmp"; } > "$file"
  fi
  rm -f "$file.tmp"
}

# a copied checkout may belong to another user: name it safe for these read-only calls
git_() { git -c safe.directory="$ROOT" "$@"; }

{
  t0=$(date +%s)
  commit=$(git_ rev-parse HEAD 2>>"$OUTDIR/info.log") || commit=""
  commit_source=git
  git_error=""
  dirty=""
  if [[ "${GPU_CHECK_COMMIT:-}" =~ ^[0-9a-f]{40}$ ]]; then
    # the caller knows what the tree was copied from; git's HEAD (if any) is kept in info.log
    [[ -n "$commit" ]] && echo "git HEAD here: $commit (GPU_CHECK_COMMIT given: $GPU_CHECK_COMMIT)" >> "$OUTDIR/info.log"
    commit=$GPU_CHECK_COMMIT
    commit_source=GPU_CHECK_COMMIT
  elif [[ -n "$commit" ]]; then
    if [[ -n "$(git_ status --porcelain 2>/dev/null)" ]]; then dirty=true; else dirty=false; fi
  else
    git_error="git rev-parse HEAD failed (see info.log)"
  fi
  {
    echo "commit=$commit"
    echo "commit_source=$commit_source"
    [[ -n "$dirty" ]] && echo "dirty=$dirty"
    echo "date=$(date -u +%Y-%m-%dT%H:%M:%SZ)"
    [[ -n "$git_error" ]] && echo "git_error=$git_error"
  } > "$OUTDIR/meta.txt"
  { git_ status --short 2>&1 | head -50; echo; nvidia-smi 2>&1; nvidia-smi -q -d CLOCK,PERFORMANCE 2>&1; } >> "$OUTDIR/info.log"
  gpu_info "$OUTDIR/gpu-info.csv"
  record info 0 $(( $(date +%s) - t0 )) 0 ""
}
log "info: commit ${commit:-unknown}${dirty:+ (dirty=$dirty)}; $(head -n 2 "$OUTDIR/gpu-info.csv" 2>/dev/null | tail -n 1 | cut -d, -f1)"

# ---------------------------------------------------------------------------------------------
# build: this GPU's architecture only, all cores
# ---------------------------------------------------------------------------------------------
if [[ -z "${UNET_CUDA_ARCH:-}" ]]; then
  cap=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -n 1 | tr -d ' .')
  if [[ "$cap" =~ ^[0-9]+$ ]]; then UNET_CUDA_ARCH=$cap; else UNET_CUDA_ARCH=native; fi
  # Hopper: build its architecture-specific instructions too (wgmma, for v6_tf32_wgmma)
  if [[ "$UNET_CUDA_ARCH" == 90 ]]; then UNET_CUDA_ARCH=90a; fi
fi
export UNET_CUDA_ARCH
export CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}"

if wanted build; then
  log "build: UNET_CUDA_ARCH=$UNET_CUDA_ARCH CMAKE_BUILD_PARALLEL_LEVEL=$CMAKE_BUILD_PARALLEL_LEVEL"
  run_stage build 300 "$PY" -m pip install --no-build-isolation --no-deps -e . -q
else
  skip_stage build "not in GPU_CHECK_STAGES"
fi

# versions, settings and whether our CUDA backend imports (env.json: unet_cuda_status)
run_stage env 60 "$PY" bench/benchlib.py "$OUTDIR/env.json"
log "env: $("$PY" -c 'import json,sys; print("unet_cuda CUDA backend:", json.load(open(sys.argv[1])).get("unet_cuda_status"))' "$OUTDIR/env.json" 2>/dev/null || echo "env.json missing")"

# ---------------------------------------------------------------------------------------------
# GPU tests
# ---------------------------------------------------------------------------------------------
if wanted gpu-tests; then
  # every conv3x3 test runs for six kernel versions (plain and concatenated input): up to 240 s in
  # one process; their float64 NumPy references are CPU work, so spread them over xdist workers
  workers="${GPU_TESTS_WORKERS:-6}"
  parallel=()
  if [[ "$workers" =~ ^[1-9][0-9]*$ ]] && "$PY" -c "import xdist" > /dev/null 2>&1; then
    parallel=(-n "$workers")
    threads=$(( $(nproc) / workers )); (( threads < 1 )) && threads=1
    export OMP_NUM_THREADS=$threads OPENBLAS_NUM_THREADS=$threads MKL_NUM_THREADS=$threads
  fi
  log "gpu-tests: ${parallel[*]:-one process}"
  run_stage gpu-tests "${GPU_TESTS_LIMIT:-240}" "$PY" -m pytest -m gpu -q -p no:cacheprovider "${parallel[@]}" \
    --junitxml="$OUTDIR/gpu-tests.xml"
  unset OMP_NUM_THREADS OPENBLAS_NUM_THREADS MKL_NUM_THREADS
else
  skip_stage gpu-tests "not in GPU_CHECK_STAGES"
fi

# ---------------------------------------------------------------------------------------------
# one training step of the paper's network op by op, in each precision (python -m unet_cuda.profile)
# ---------------------------------------------------------------------------------------------
if wanted profile; then
  for precision in ${PROFILE_PRECISIONS:-tf32 bf16 fp32}; do
    run_stage "profile-$precision" 60 "$PY" -m unet_cuda.profile --precision "$precision" --top 0 \
      --json "$OUTDIR/profile-$precision.json"
  done
  # the same step with the GEMM plans measured (profile --autotune), op by op beside the rules'
  for precision in ${PROFILE_AUTOTUNE_PRECISIONS-tf32}; do
    run_stage "profile-$precision-autotuned" 90 "$PY" -m unet_cuda.profile --precision "$precision" \
      --autotune --top 0 --json "$OUTDIR/profile-$precision-autotuned.json"
  done
  # the step with a kernel version that is not (yet) a precision mode's, op by op beside its mode's
  for kernel in ${PROFILE_KERNELS-v7_tf32_halo v8_bf16_halo v9_fp32_halo}; do
    run_stage "profile-$kernel" 60 "$PY" -m unet_cuda.profile --kernel "$kernel" --top 0 \
      --json "$OUTDIR/profile-$kernel.json"
  done
else
  for precision in tf32 bf16 fp32; do skip_stage "profile-$precision" "not in GPU_CHECK_STAGES"; done
  for precision in ${PROFILE_AUTOTUNE_PRECISIONS-tf32}; do
    skip_stage "profile-$precision-autotuned" "not in GPU_CHECK_STAGES"
  done
  for kernel in ${PROFILE_KERNELS-v7_tf32_halo v8_bf16_halo v9_fp32_halo}; do skip_stage "profile-$kernel" "not in GPU_CHECK_STAGES"; done
fi

# ---------------------------------------------------------------------------------------------
# compute-sanitizer over the driver
# ---------------------------------------------------------------------------------------------
if wanted sanitizer; then
  if command -v compute-sanitizer > /dev/null 2>&1; then
    SANITIZER=compute-sanitizer
  elif [[ -x /usr/local/cuda/bin/compute-sanitizer ]]; then
    SANITIZER=/usr/local/cuda/bin/compute-sanitizer
  elif [[ -x /usr/local/cuda/compute-sanitizer/compute-sanitizer ]]; then
    SANITIZER=/usr/local/cuda/compute-sanitizer/compute-sanitizer
  else
    SANITIZER=""
  fi
  # 90 s per tool, 240 s for the four together, so that one slow tool cannot starve the benchmarks
  san_end=$(( $(date +%s) + ${SANITIZER_LIMIT:-240} ))
  for tool in memcheck racecheck initcheck synccheck; do
    if [[ " ${SANITIZER_TOOLS:-memcheck racecheck initcheck synccheck} " != *" $tool "* ]]; then
      skip_stage "sanitizer-$tool" "not in SANITIZER_TOOLS"
      continue
    fi
    if [[ -z "$SANITIZER" ]]; then
      skip_stage "sanitizer-$tool" "compute-sanitizer not found"
      continue
    fi
    san_left=$(( san_end - $(date +%s) ))
    if (( san_left < 10 )); then
      skip_stage "sanitizer-$tool" "the sanitizers' ${SANITIZER_LIMIT:-240} s are spent"
      continue
    fi
    run_stage "sanitizer-$tool" $(( san_left < 90 ? san_left : 90 )) \
      "$SANITIZER" --tool "$tool" "$PY" bench/sanitizer_driver.py
  done
else
  for tool in memcheck racecheck initcheck synccheck; do skip_stage "sanitizer-$tool" "not in GPU_CHECK_STAGES"; done
fi

# ---------------------------------------------------------------------------------------------
# benchmarks: the end-to-end step first (the headline figure), then the per-op table
# ---------------------------------------------------------------------------------------------
if wanted bench; then
  left=$(( DEADLINE - $(date +%s) - RESERVE ))
  # up to 420 s: the training step in three precisions (eager and as a CUDA graph) against PyTorch's
  # three settings, the prediction in each, then 318 per-op cases; whatever the budget leaves
  bench_cap="${BENCH_LIMIT:-420}"
  bench_limit=$(( left < bench_cap ? left : bench_cap ))
  # the benchmarks skip themselves 20 s before the limit so that pytest still writes its JSON
  export UNET_BENCH_DEADLINE=$(( $(date +%s) + bench_limit - 20 ))
  export UNET_BENCH_RECORD="$OUTDIR/bench-records.jsonl"
  : > "$UNET_BENCH_RECORD"
  run_stage bench "$bench_limit" "$PY" -m pytest bench/test_bench_train_step.py bench/test_bench_kernels.py \
    -q -p no:cacheprovider --benchmark-json="$OUTDIR/benchmarks.json" --junitxml="$OUTDIR/bench-tests.xml"
  gpu_info "$OUTDIR/gpu-info-after.csv"
else
  skip_stage bench "not in GPU_CHECK_STAGES"
fi

# ---------------------------------------------------------------------------------------------
# Nsight Compute: why the GEMM kernels run at the speed they do (throughputs, occupancy, stalls)
# ---------------------------------------------------------------------------------------------
if wanted ncu; then
  NCU=$(command -v ncu 2>/dev/null || ls /usr/local/cuda/bin/ncu /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -n 1)
  if [[ -z "$NCU" ]]; then
    skip_stage ncu "ncu not found"
  else
    # only the kernels between the driver's cudaProfilerStart and Stop; clocks left as they are
    run_stage ncu "${NCU_LIMIT:-150}" "$NCU" --profile-from-start off --clock-control none \
      --section SpeedOfLight --section Occupancy --section LaunchStats --section WarpStateStats \
      --section MemoryWorkloadAnalysis \
      --section SchedulerStats --section ComputeWorkloadAnalysis --export "$OUTDIR/ncu" --force-overwrite \
      "$PY" bench/ncu_driver.py "$OUTDIR/ncu-cases.json"
    if [[ -f "$OUTDIR/ncu.ncu-rep" ]]; then
      timeout 60 "$NCU" --import "$OUTDIR/ncu.ncu-rep" --csv --page details > "$OUTDIR/ncu-details.csv" \
        2>> "$OUTDIR/ncu.log" || log "ncu: the report could not be read back as CSV (see ncu.log)"
      # every metric collected, one row per kernel: among them the stall reasons behind the
      # WarpStateStats charts (smsp__average_warps_issue_stalled_*), which the details page omits
      timeout 60 "$NCU" --import "$OUTDIR/ncu.ncu-rep" --csv --page raw > "$OUTDIR/ncu-raw.csv" \
        2>> "$OUTDIR/ncu.log" || log "ncu: the raw page could not be read back as CSV (see ncu.log)"
    fi
  fi
else
  skip_stage ncu "not in GPU_CHECK_STAGES"
fi

# ---------------------------------------------------------------------------------------------
# optional: a timed ISBI training run of the paper's network
# ---------------------------------------------------------------------------------------------
if wanted isbi; then
  if [[ -z "${ISBI_DIR:-}" || ! -f "${ISBI_DIR}/train-volume.tif" ]]; then
    skip_stage isbi "ISBI_DIR is not set or holds no train-volume.tif"
  else
    minutes="${ISBI_MINUTES:-3}"
    left=$(( DEADLINE - $(date +%s) - RESERVE ))
    if [[ "$minutes" == auto ]]; then   # the training gets what is left after 60 s of overhead
      minutes=$(awk -v s=$(( left - 60 )) 'BEGIN { printf "%.2f", (s > 0 ? s : 0) / 60 }')
      isbi_limit=$left
    else
      # training time plus two minutes for start-up, weight maps and the final validation
      isbi_limit=$(( left < ${minutes%.*} * 60 + 120 ? left : ${minutes%.*} * 60 + 120 ))
    fi
    if (( isbi_limit < 90 )); then
      skip_stage isbi "only ${left} s of the budget left"
    else
      log "isbi: ${minutes} min of training, limit ${isbi_limit} s"
      run_stage isbi "$isbi_limit" "$PY" bench/isbi_run.py --data "$ISBI_DIR" --out "$OUTDIR" --minutes "$minutes"
    fi
  fi
fi

# ---------------------------------------------------------------------------------------------
# the results JSON and the table, last
# ---------------------------------------------------------------------------------------------
log "collect: done in $(( $(date +%s) - START )) s; results:"
timeout 60 "$PY" bench/collect_results.py "$OUTDIR" 2> "$OUTDIR/collect.log"
rc=$?
if (( rc != 0 )); then
  echo "gpu_check: collect_results.py failed (rc=$rc), see $OUTDIR/collect.log" >&2
  exit "$rc"
fi
exit 0
