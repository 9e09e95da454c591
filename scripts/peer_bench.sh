#!/usr/bin/env bash
# Side-by-side timing of `moshi-mlx bench` against Kyutai's moshi_mlx 0.3.0 (the reference),
# with the harness in ../shared/peer_bench (run from there, never copied). Linux x86_64 only:
# the reference's Rust codec wheel is cp311 manylinux.
#
#   scripts/peer_bench.sh [options]
#
#   --setup-only        create the reference venv(s) and the shared inputs, then stop
#   --rounds N          alternating rounds: reference, ours, reference, ours ... (default 3)
#   --rows "R ..."      rows to run (default: tiny medium tiny-q4 tiny-q8 medium-q4 medium-q8 mimi)
#                       also: tiny-f32 medium-f32 7b (bf16) 7b-q4 7b-q8, and Kyutai's
#                       speech-to-text at the real STT 1B size: stt-1b (bf16) stt-1b-q4 stt-1b-q8
#   --with-7b           add the 7b row (bf16, 1 warm-up + 3 timed steps; ~2 min build, 15 GB)
#   --steps N / --warmup N        timed / untimed frames per run (default 50 / 5, as RESULTS.md)
#   --quant-steps N     timed frames for the q4/q8 rows (default 20: MLX's CPU quantized matmul
#                       is ~10x slower than bf16 here, see RESULTS.md)
#   --ref-mlx032        also time the reference on MLX 0.32.4 (our MLX), third side
#   --taskset CPUS      prefix every command with `taskset -c CPUS` (same for both sides)
#   --out DIR           results folder (default bench_results/peer-<date>; gitignored)
#   --stt "ROWS"        speech-to-text rows instead (scripts/peer_stt_bench.py), each
#                       stt-<1b|2.6b>[-q4|-q8][-b<batch>] (both sides, alternating) or
#                       ours:<row> (ours only), or stt-mimi (Mimi encode, 32 codebooks);
#                       with --ref-mlx032 the reference also runs on MLX 0.32.4
#
# Writes DIR/ref.jsonl, DIR/ours.jsonl (and DIR/ref032.jsonl), DIR/log.txt, then prints
# compare_results.py's table and scripts/peer_table.py's README table (DIR/table.md).
# Thread variables (OMP_NUM_THREADS, RAYON_NUM_THREADS, ...) are inherited unchanged by both
# sides; set them in the environment of this script. Run nothing else meanwhile.
set -euo pipefail
cd "$(dirname "$0")/.."
PEER=../shared/peer_bench
ROUNDS=3 STEPS=50 WARMUP=5 QSTEPS=20 REF2=0 SETUP_ONLY=0 PFX=""
ROWS="tiny medium tiny-q4 tiny-q8 medium-q4 medium-q8 mimi" STT=""
OUT=bench_results/peer-$(date +%Y%m%d-%H%M%S)
while [ $# -gt 0 ]; do
  case $1 in
    --setup-only) SETUP_ONLY=1 ;;
    --rounds) ROUNDS=$2; shift ;;
    --rows) ROWS=$2; shift ;;
    --with-7b) ROWS="$ROWS 7b" ;;
    --steps) STEPS=$2; shift ;;
    --warmup) WARMUP=$2; shift ;;
    --quant-steps) QSTEPS=$2; shift ;;
    --ref-mlx032) REF2=1 ;;
    --taskset) PFX="taskset -c $2"; shift ;;
    --out) OUT=$2; shift ;;
    --stt) STT=$2; shift ;;
    -h|--help) sed -n '2,28p' "$0"; exit 0 ;;
    *) echo "peer_bench.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done
[ -f $PEER/ref_step_bench.py ] || { echo "peer_bench.sh: $PEER/ref_step_bench.py not found" >&2; exit 1; }
[ -x .venv/bin/moshi-mlx ] || { echo "peer_bench.sh: install the project first (.venv, see README)" >&2; exit 1; }

# -- reference venvs (gitignored .venv-*/), as ../shared/peer_bench/README.md says -----------
if [ ! -x .venv-ref/bin/python ]; then
  echo "== creating .venv-ref (moshi_mlx 0.3.0 on mlx[cpu] 0.26.5)"
  python3.11 -m venv .venv-ref
  .venv-ref/bin/pip install -q -r $PEER/requirements-ref.txt
fi
if [ $REF2 = 1 ] && [ ! -x .venv-ref-mlx032/bin/python ]; then
  echo "== creating .venv-ref-mlx032 (moshi_mlx 0.3.0 on mlx[cpu] 0.32.4, --no-deps)"
  python3.11 -m venv .venv-ref-mlx032
  .venv-ref-mlx032/bin/pip install -q "mlx[cpu]==0.32.4" "numpy>=2.1,<2.3" "safetensors>=0.4,<0.6" \
    "huggingface-hub>=0.24,<0.29" rustymimi==0.4.1 sentencepiece==0.2.0 "sphn>=0.2,<0.3"
  .venv-ref-mlx032/bin/pip install -q --no-deps moshi_mlx==0.3.0
fi

# -- shared inputs: the 7B LM config (upstream keys) and one random Mimi checkpoint ------------
mkdir -p bench_results
CFG=bench_results/moshi_7b_202409.json
MIMI_CKPT=bench_results/mimi_random_seed0.safetensors
if [ ! -f $CFG ]; then
  .venv/bin/python - "$CFG" <<'EOF'
import json, sys
from pathlib import Path

keys = Path("tests/fixtures/full_size_keys/moshi_7b_keys.json")
if keys.is_file():  # the released config, verbatim
    cfg = json.loads(keys.read_text())["config"]
else:  # same structure from our preset, plus the upstream keys that say how it is built
    from moshi_mlx import LmConfig

    cfg = LmConfig.moshi_7b().to_dict()
    cfg.update(gating="silu", norm="rms_norm_f32", positional_embedding="rope", causal=True,
               depformer_gating="silu", depformer_pos_emb="none", depformer_causal=True,
               depformer_context=8, depformer_max_period=10000)
    cfg = {k: v for k, v in cfg.items() if v is not None}
Path(sys.argv[1]).write_text(json.dumps(cfg, indent=1))
EOF
fi
if [ ! -f $MIMI_CKPT ]; then
  echo "== writing the random Mimi checkpoint (real key names and shapes, seed 0, ~385 MB)"
  env -u PYTHONPATH .venv-ref/bin/python $PEER/ref_step_bench.py make-mimi-ckpt $MIMI_CKPT --seed 0
fi
STT_CFG=bench_results/stt_1b_en_fr.json  # the released STT 1B config (upstream keys)
if [ ! -f $STT_CFG ]; then
  .venv/bin/python - "$STT_CFG" <<'EOF'
import json, sys
from pathlib import Path

cfg = json.loads(Path("tests/fixtures/full_size_keys/stt_1b_keys.json").read_text())["config"]
cfg.update(model_type="stt", stt_config={"audio_delay_seconds": 0.5,
                                         "audio_silence_prefix_seconds": 0.0})
# upstream's default, written out: the reference's MLX config reader requires the field
cfg.setdefault("depformer_dim_feedforward", int(cfg["hidden_scale"] * cfg["depformer_dim"]))
Path(sys.argv[1]).write_text(json.dumps(cfg, indent=1))
EOF
fi
[ $SETUP_ONLY = 1 ] && { echo "setup done: .venv-ref, $CFG, $STT_CFG, $MIMI_CKPT"; exit 0; }

mkdir -p "$OUT"

# -- the rows -------------------------------------------------------------------------------
LOG=$OUT/log.txt
shape() {  # row -> the scale-down flags, the same on both sides
  case ${1%%-*} in
    tiny) echo "--dim 256 --layers 2 --dep-dim 256 --dep-layers 2" ;;
    medium) echo "--dim 1024 --layers 8 --dep-dim 512 --dep-layers 2" ;;
    7b|stt) echo "" ;;
  esac
}
run() {  # side, jsonl, command...
  local side=$1 out=$2; shift 2
  local target=$out
  [ "$side" = ours ] && target=$out.raw  # converted below
  echo "### $(date +%T) $side: $*" >> "$LOG"
  if ! $PFX "$@" --json-out "$target" >> "$LOG" 2>&1; then
    echo "  $side FAILED (see $LOG)"; return 0
  fi
  if [ "$side" = ours ]; then  # our results -> the reference's record format
    .venv/bin/python scripts/peer_records.py "$out.raw" >> "$out" && rm "$out.raw"
  fi
  .venv/bin/python -c 'import json, sys; r = [json.loads(l) for l in open(sys.argv[1])][-1]
print("  %-7s %-22s median %9.2f ms  p90 %9.2f" % (sys.argv[2], r["bench"], r["timing"]["median_ms"], r["timing"]["p90_ms"]))' "$out" "$side"
}
ref() { run ref "$OUT/ref.jsonl" env -u PYTHONPATH .venv-ref/bin/python $PEER/ref_step_bench.py "$@"
        if [ $REF2 = 1 ]; then
          run ref032 "$OUT/ref032.jsonl" env -u PYTHONPATH .venv-ref-mlx032/bin/python $PEER/ref_step_bench.py "$@"
        fi; }
ours() { run ours "$OUT/ours.jsonl" .venv/bin/moshi-mlx bench --sampler top-p "$@"; }

row() {
  local name=$1 steps=$STEPS warmup=$WARMUP rq="" oq="" rd=bf16 od=bfloat16 cfg=$CFG extra=""
  case $name in
    mimi)
      ref mimi --ckpt $MIMI_CKPT --steps "$STEPS" --warmup "$WARMUP"
      ours --no-lm --mimi-weights $MIMI_CKPT --steps "$STEPS" --warmup "$WARMUP"
      ref rustymimi --ckpt $MIMI_CKPT --steps "$STEPS" --warmup "$WARMUP"
      return ;;
    *-q4|*-q8) rq="--quant ${name##*-q}"; oq="-q ${name##*-q}"; steps=$QSTEPS ;;
    *-f32) rd=f32; od=float32 ;;
  esac
  case $name in
    7b*) steps=3; warmup=1 ;;
    stt*) cfg=$STT_CFG; extra="--batch 0" ;;  # the LM step at batch 1, as the reference
  esac
  # shellcheck disable=SC2046,SC2086
  ref lm --lm-config $cfg $(shape "$name") $rq --dtype $rd --steps $steps --warmup $warmup
  # shellcheck disable=SC2046,SC2086
  ours --random-weights --config $cfg $(shape "$name") $oq --dtype $od --steps $steps \
    --warmup $warmup --no-mimi --no-stages $extra
}

# -- speech-to-text rows (--stt): one STT step of Kyutai's moshi_mlx 0.3.0 and of ours -------
if [ -n "$STT" ]; then
  S=scripts/peer_stt_bench.py
  echo "# $(date -Is) stt rounds=$ROUNDS rows=[$STT] steps=$STEPS warmup=$WARMUP" \
    "quant_steps=$QSTEPS git $(git rev-parse --short HEAD) load: $(cat /proc/loadavg)" | tee "$LOG"
  stt_side() {  # side (ref, ref032, ours, rustymimi, mimi), harness args...
    local py=.venv/bin/python out=$OUT/stt_ours.jsonl cmd=$1
    case $1 in ref|rustymimi) py=.venv-ref/bin/python out=$OUT/stt_ref.jsonl ;; esac
    [ "$1" = ref032 ] && py=.venv-ref-mlx032/bin/python out=$OUT/stt_ref032.jsonl cmd=ref
    shift
    echo "### $(date +%T) load $(cut -d' ' -f1 /proc/loadavg) $cmd $* ($py)" >> "$LOG"
    # shellcheck disable=SC2086
    if ! env -u PYTHONPATH $PFX $py $S $cmd "$@" --json-out "$out" >> "$LOG" 2>&1; then
      echo "  $1 FAILED (see $LOG)"; return 0
    fi
    tail -n 2 "$LOG" | head -n 1
  }
  touch "$OUT/stt_ref.jsonl" "$OUT/stt_ours.jsonl" "$OUT/stt_ref032.jsonl"
  for r in $(seq 1 "$ROUNDS"); do
    for row in $STT; do
      echo "== round $r/$ROUNDS $row"
      if [ "$row" = stt-mimi ]; then
        stt_side rustymimi --ckpt $MIMI_CKPT --steps "$STEPS" --warmup "$WARMUP"
        stt_side mimi --ckpt $MIMI_CKPT --steps "$STEPS" --warmup "$WARMUP"; continue
      fi
      name=${row#ours:} steps=$STEPS args=""
      size=${name#stt-}; size=${size%%-*}
      case $name in *-q4*|*-q8*) q=${name#*-q}; args="--quant ${q%%-*}"; steps=$QSTEPS ;; esac
      case $name in *-b*) args="$args --batch ${name##*-b}" ;; esac
      # shellcheck disable=SC2086
      [ "$row" = "$name" ] && stt_side ref --size "$size" $args --steps "$steps" --warmup "$WARMUP"
      # shellcheck disable=SC2086
      [ "$row" = "$name" ] && [ $REF2 = 1 ] &&
        stt_side ref032 --size "$size" $args --steps "$steps" --warmup "$WARMUP"
      # shellcheck disable=SC2086
      stt_side ours --size "$size" $args --steps "$steps" --warmup "$WARMUP"
    done
  done
  echo "# end $(date -Is) load: $(cat /proc/loadavg)" >> "$LOG"
  .venv/bin/python $S table "$OUT/stt_ref.jsonl" "$OUT/stt_ours.jsonl" | tee "$OUT/stt_table.md"
  [ $REF2 = 1 ] && .venv/bin/python $S table "$OUT/stt_ref032.jsonl" "$OUT/stt_ours.jsonl" |
    tee "$OUT/stt_table_mlx032.md"
  echo "wrote $OUT"; exit 0
fi

{
  echo "# $(date -Is) rounds=$ROUNDS rows=[$ROWS] steps=$STEPS warmup=$WARMUP quant_steps=$QSTEPS"
  echo "# git $(git rev-parse --short HEAD)$(git diff --quiet HEAD -- moshi_mlx app || echo +dirty)"
  echo "# taskset=[${PFX}] threads: $(env | grep -E '^(OMP|OPENBLAS|MKL|RAYON|MLX)_[A-Z_]*THREADS' | tr '\n' ' ')"
  echo "# load: $(cat /proc/loadavg)"
} | tee "$LOG"
for r in $(seq 1 "$ROUNDS"); do
  for name in $ROWS; do
    echo "== round $r/$ROUNDS $name"
    row "$name"
  done
done
echo "# end $(date -Is) load: $(cat /proc/loadavg)" >> "$LOG"

SIDES="$OUT/ref.jsonl $OUT/ours.jsonl"
[ $REF2 = 1 ] && SIDES="$SIDES $OUT/ref032.jsonl"
# shellcheck disable=SC2086
.venv/bin/python $PEER/compare_results.py $SIDES | tee "$OUT/compare.txt"
# shellcheck disable=SC2086
.venv/bin/python scripts/peer_table.py $SIDES | tee "$OUT/table.md"
echo "wrote $OUT"
