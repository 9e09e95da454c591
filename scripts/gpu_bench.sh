#!/usr/bin/env bash
# `moshi-mlx bench` of the full 7B (random weights) on an NVIDIA machine with MLX's CUDA backend,
# for a machine with Python 3.12 and no network: everything it lacks travels as wheels in .whl/
# (gitignored through .git/info/exclude).
#
#   scripts/gpu_bench.sh pack            here (any Linux box with the project venv): download the
#                                        wheels into .whl/, split the CUDA one in two, print sizes
#                                        and the two device calls to make
#   scripts/gpu_bench.sh stash           device, call 1: keep the wheels carried so far in
#                                        /tmp/moshi-whl (survives while the machine stays warm)
#   scripts/gpu_bench.sh run [STEPS]     device, call 2: reassemble, install into /tmp/site, run
#                                        q4 then bf16, each with the serial and the pipelined
#                                        engine and Mimi on the GPU and on the CPU (STEPS timed
#                                        frames each, default 20), and print a table; JSON
#                                        results go to $OUT (or ./gpu_results)
#
# Why two calls: mlx-cuda-13 0.32.4 is a 90 MB wheel (its kernels are already compressed, xz
# only gets it to 75 MB) and one call carries at most 64 MiB, working tree included.
# BENCH_ARGS adds flags to every bench (e.g. BENCH_ARGS="--no-mimi"); RUNS picks the runs
# (default "q4 bf16"), ENGINES the engines ("serial pipelined"), MIMI_DEVICES where Mimi runs
# ("gpu cpu").
set -euo pipefail
cd "$(dirname "$0")/.."
MLX=0.32.4 MLX_LM=0.32.2 CUDART=13.0.96
CUDA_WHEEL=mlx_cuda_13-$MLX-py3-none-manylinux_2_35_x86_64.whl
CUDART_WHEEL=nvidia_cuda_runtime-$CUDART-py3-none-manylinux2014_x86_64.manylinux_2_17_x86_64.whl
STASH=/tmp/moshi-whl SITE=/tmp/site PKG=/tmp/moshi-pkg HEADERS=/tmp/cuda-headers
mode=${1:-run}

if [ "$mode" = pack ]; then
  grep -qxF /.whl/ .git/info/exclude 2>/dev/null || echo /.whl/ >> .git/info/exclude
  mkdir -p .whl
  dl=(.venv/bin/pip download -q --no-deps --only-binary=:all: --python-version 3.12
      --implementation cp --platform manylinux_2_35_x86_64 -d .whl)
  # mlx[cuda13] = mlx + mlx-cuda-13 (CUDA 13 libraries: the machine's PyTorch cu130 has them);
  # mlx-lm's own dependencies (transformers, numpy, ...) are on the machine already.
  "${dl[@]}" "mlx==$MLX" "mlx-cuda-13==$MLX" "mlx-lm==$MLX_LM"
  # Spare CUDA 13 runtime headers (2 MB), used only if the machine has none: MLX compiles
  # kernels at run time with NVRTC and needs cuda_runtime.h & co.
  .venv/bin/pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux2014_x86_64 -d .whl "nvidia-cuda-runtime==$CUDART"
  if [ -f .whl/$CUDA_WHEEL ]; then
    half=$(( ($(stat -c %s .whl/$CUDA_WHEEL) + 1) / 2 ))
    split -b "$half" -d -a 1 .whl/$CUDA_WHEEL .whl/$CUDA_WHEEL.part
    (cd .whl && sha256sum $CUDA_WHEEL > $CUDA_WHEEL.sha256) && rm .whl/$CUDA_WHEEL
  fi
  ls -l .whl
  tree_mb=$(git ls-files -z | xargs -0 stat -c %s | awk '{s+=$1} END {printf "%.1f", s/1e6}')
  fix_mb=$(git ls-files -z tests/fixtures | xargs -0 stat -c %s | awk '{s+=$1} END {printf "%.1f", s/1e6}')
  cat <<EOF

Tracked working tree: $tree_mb MB, of which tests/fixtures $fix_mb MB. A call carries at most
64 MiB (67.1 MB) in all, so tests/fixtures must not travel during the two calls.
Device call 1 (about 10 s):
  run(command="bash scripts/gpu_bench.sh stash", timeout_s=120,
      carry=[".whl/$CUDA_WHEEL.part0", ".whl/$CUDA_WHEEL.sha256",
             ".whl/mlx-$MLX-cp312-cp312-manylinux_2_35_x86_64.whl", ".whl/mlx_lm-$MLX_LM-py3-none-any.whl"])
Device call 2, right after (same warm machine):
  run(command="bash scripts/gpu_bench.sh run 20", timeout_s=600,
      carry=[".whl/$CUDA_WHEEL.part1", ".whl/$CUDART_WHEEL"])
EOF
  exit 0
fi

stash() {
  mkdir -p $STASH
  if compgen -G ".whl/*" > /dev/null; then cp -f .whl/* $STASH/; fi
}

if [ "$mode" = stash ]; then
  stash
  ls -l $STASH
  exit 0
fi
[ "$mode" = run ] || { echo "usage: $0 pack|stash|run [STEPS]" >&2; exit 2; }
STEPS=${2:-20}
OUT=${OUT:-gpu_results}
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd)
# Stderr aside: the device tool brings back at most 8 files from $OUT, one JSON per run.
ERRS=/tmp/gpu-bench-err && rm -rf $ERRS && mkdir -p $ERRS
stash

# -- install: MLX, mlx-lm and this tree, without pip's resolver or the network ---------------
if [ ! -f $STASH/$CUDA_WHEEL ]; then
  for p in 0 1; do
    [ -f $STASH/$CUDA_WHEEL.part$p ] || {
      echo "gpu_bench: $CUDA_WHEEL.part$p missing: carry it (see 'scripts/gpu_bench.sh pack')" >&2
      exit 1
    }
  done
  cat $STASH/$CUDA_WHEEL.part0 $STASH/$CUDA_WHEEL.part1 > $STASH/$CUDA_WHEEL
  (cd $STASH && sha256sum -c $CUDA_WHEEL.sha256)
fi
rm -rf $SITE $HEADERS && mkdir -p $SITE $HEADERS
python3 - $SITE $HEADERS $STASH/*.whl <<'EOF'
import sys, zipfile
# Wheels without .data folders are plain zips: extracting them is installing them. The spare
# CUDA headers go aside, so that the machine's own nvidia/ packages stay the ones linked.
site, headers, wheels = sys.argv[1], sys.argv[2], sys.argv[3:]
for wheel in wheels:
    name = wheel.rsplit("/", 1)[-1]
    zipfile.ZipFile(wheel).extractall(headers if name.startswith("nvidia_") else site)
    print("installed", name)
EOF

# The package maps app/ and convert/ into moshi_mlx only when installed; do that mapping here
# with links, so the current tree runs (no setuptools needed).
rm -rf $PKG && mkdir -p $PKG && cp -r moshi_mlx $PKG/
ln -s "$PWD/app" $PKG/moshi_mlx/app
ln -s "$PWD/convert" $PKG/moshi_mlx/convert
export PYTHONPATH=$PKG:$SITE

# libmlx.so finds the CUDA libraries through $ORIGIN/../../nvidia/... (the machine's PyTorch
# copies), and NVRTC needs the CUDA runtime headers for the kernels MLX compiles at run time.
eval "$(HEADERS=$HEADERS python3 - $SITE <<'EOF'
import os, sys
site = sys.argv[1]
roots = [os.path.join(p, "nvidia") for p in sys.path[1:] if p and not p.startswith(site)]
roots = [r for r in roots if os.path.isdir(r)]
if roots:
    os.symlink(roots[0], os.path.join(site, "nvidia"))
libs = [os.path.join(r, d, "lib") for r in roots for d in sorted(os.listdir(r))]
libs = [d for d in libs if os.path.isdir(d)]
print(f"export LD_LIBRARY_PATH={':'.join(libs)}${{LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}}")
homes = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
homes += [os.path.join(r, d) for r in roots for d in ("cu13", "cuda_runtime")]
homes += [os.path.join(os.environ["HEADERS"], "nvidia", "cu13")]  # the spare ones, last
for h in homes:
    if h and os.path.isfile(os.path.join(h, "include", "cuda_runtime.h")):
        print(f"export CUDA_HOME={h}")
        break
else:
    print("echo 'gpu_bench: no cuda_runtime.h found; MLX kernels compiled at run time will fail' >&2")
EOF
)"
echo "CUDA_HOME=${CUDA_HOME:-unset}"

# mlx_lm's __init__ imports transformers; if the machine's copy is too old for it, use only the
# two mlx-lm modules the library needs (sampling and KV caches), which depend on MLX alone.
if ! python3 -c "import mlx_lm.sample_utils, mlx_lm.models.cache" 2> "$ERRS/mlx_lm_import.txt"; then
  echo "gpu_bench: full mlx_lm does not import here ($(tail -1 "$ERRS/mlx_lm_import.txt")); using its sampling and cache modules alone"
  shim=/tmp/mlx-lm-shim/mlx_lm
  rm -rf /tmp/mlx-lm-shim && mkdir -p $shim/models
  echo "__version__ = '$MLX_LM'" > $shim/__init__.py
  cp $SITE/mlx_lm/sample_utils.py $shim/
  cp $SITE/mlx_lm/models/__init__.py $SITE/mlx_lm/models/base.py $SITE/mlx_lm/models/cache.py $shim/models/
  export PYTHONPATH=/tmp/mlx-lm-shim:$PYTHONPATH
fi

python3 - <<'EOF'
import mlx.core as mx
x = mx.arange(8, dtype=mx.float32)
mx.eval(mx.compile(lambda a: mx.exp(a) * 2 + 1)(x))  # exercises NVRTC and the headers
print("mlx", mx.__version__, mx.default_device(), mx.device_info())
EOF
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2> /dev/null || true

# -- the runs ------------------------------------------------------------------------------
declare -A FLAGS=([q4]="-q 4" [q8]="-q 8" [bf16]="")
for run in ${RUNS:-q4 bf16}; do
  [ -n "${FLAGS[$run]+set}" ] || { echo "gpu_bench: unknown run $run (q4, q8, bf16)" >&2; continue; }
  for engine in ${ENGINES:-serial pipelined}; do
    for mimi in ${MIMI_DEVICES:-gpu cpu}; do
      name="${run}_${engine}_mimi-$mimi"
      echo "== 7B random weights, $name, $STEPS frames after 3"
      # From $PKG: the repository's own moshi_mlx/ (without app/) must not come first on sys.path.
      # shellcheck disable=SC2086
      if (cd $PKG && python3 -m moshi_mlx.app bench --config moshiko-7b --random-weights \
          ${FLAGS[$run]} --engine "$engine" --mimi-device "$mimi" --steps "$STEPS" --warmup 3 \
          --json ${BENCH_ARGS:-} > "$OUT/7b_$name.json" 2> "$ERRS/7b_$name.err"); then
        echo "   done"
      else
        echo "   FAILED:"; tail -5 "$ERRS/7b_$name.err"
      fi
    done
  done
done

python3 - "$OUT" <<'EOF'
import json, pathlib, sys
rows = []
for path in sorted(pathlib.Path(sys.argv[1]).glob("7b_*.json")):
    try:
        r = json.loads(path.read_text())
    except json.JSONDecodeError:
        continue
    rows.append((path.stem[3:], r))
keys = ["frame_interval_ms_p50", "frame_interval_ms_p95", "frame_latency_ms_p50", "lm_step_ms_p50",
        "temporal_ms_p50", "depth_ms_p50", "mimi_ms_p50", "rtf", "peak_memory_gb",
        "peak_memory_full_context_gb", "build_s"]
print("| run | " + " | ".join(keys) + " |")
print("|---" * (len(keys) + 1) + "|")
for name, r in rows:
    print(f"| {name} | " + " | ".join(str(r.get(k)) for k in keys) + " |")
if rows:
    r = rows[0][1]
    print(f"\ndevice {r.get('device')} {r.get('device_info')}, MLX {r.get('mlx_version')}")
EOF
