#!/usr/bin/env bash
# Kyutai's clients, unchanged, against `moshi-mlx serve`: their web client in headless Chromium
# (scripts/kyutai_client_check.py), or with --cli their command-line client on a virtual sound
# card (scripts/kyutai_cli_check.py).
#
# Not part of CI: the web client must be built from its source (github.com/kyutai-labs/moshi,
# folder client/), which CI cannot fetch, and --cli installs PyPI's `moshi` in a throwaway venv.
# Build the web client once, anywhere:
#   git clone https://github.com/kyutai-labs/moshi && cd moshi/client && npm ci && npm run build
# then, from this repository (with its .venv, `pip install -e ".[dev]"`, and chromium installed):
#   scripts/kyutai_client_check.sh PATH/TO/moshi/client/dist [MODEL] [-- SERVER FLAGS...]
#   scripts/kyutai_client_check.sh --cli [MODEL]    (pulseaudio: scripts/audio_env.sh install)
# MODEL is a folder `moshi-mlx serve --hf-path` takes; without it the test suite's fixture model
# (tiny LM and Mimi from tests/fixtures, converted as tests/conftest.py does) is built in a
# temporary folder. SCREENSHOT=FILE (default ./kyutai-client.png) keeps the page's picture.
# What they check and the results: docs/kyutai-clients.md. Exit 0 when every check passes.
set -euo pipefail

if [[ $# -lt 1 || $1 == -h || $1 == --help ]]; then
    sed -n '2,16p' "$0" | sed 's/^# \{0,1\}//'
    exit 2
fi
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
PY="$ROOT/.venv/bin/python"
MOSHI_MLX="$ROOT/.venv/bin/moshi-mlx"
if [[ ! -x $PY ]]; then
    PY=python3
    MOSHI_MLX="$(command -v moshi-mlx)"
fi
CLIENT="$1"  # or --cli
shift
MODEL=""
if [[ $# -gt 0 && $1 != -- ]]; then
    MODEL="$1"
    shift
fi
[[ ${1:-} == -- ]] && shift

TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT
if [[ -z $MODEL ]]; then
    MODEL="$TMP/moshi-fixture"
    echo "building the fixture model in $MODEL"
    (cd "$ROOT/tests" && "$PY" - "$TMP" <<'EOF'
import shutil
import sys
from pathlib import Path

from conftest import LM_DIR, MIMI_DIR, train_spm
from moshi_mlx.convert.convert import convert

tmp = Path(sys.argv[1])
repo = tmp / "pytorch"
repo.mkdir()
shutil.copy(LM_DIR / "weights.safetensors", repo / "model.safetensors")
shutil.copy(MIMI_DIR / "weights.safetensors", repo / "tokenizer-e351c8d8-checkpoint125.safetensors")
shutil.copy(train_spm(tmp / "spm"), repo / "tokenizer_spm_32k_3.model")
shutil.copy(LM_DIR / "config.json", repo / "config.json")
shutil.copy(MIMI_DIR / "config.json", repo / "mimi_config.json")
convert(repo, tmp / "moshi-fixture", dtype="float32", mimi_config=repo / "mimi_config.json")
EOF
    )
fi

if [[ $CLIENT == --cli ]]; then
    "$PY" "$ROOT/scripts/kyutai_cli_check.py" "$MODEL" --moshi-mlx "$MOSHI_MLX"
    exit
fi
"$PY" "$ROOT/scripts/kyutai_client_check.py" "$CLIENT" "$MODEL" \
    --moshi-mlx "$MOSHI_MLX" --screenshot "${SCREENSHOT:-kyutai-client.png}" \
    -- "$@"
