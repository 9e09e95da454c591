"""Shared test fixtures: paths to the reference data and small models built from it."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

FIXTURES = Path(__file__).parent / "fixtures"
MIMI_DIR = FIXTURES / "mimi"
LM_DIR = FIXTURES / "lm"
UPSTREAM_MLX_DIR = FIXTURES / "upstream_mlx"
FULL_SIZE_KEYS = FIXTURES / "full_size_keys"
# The installed command, as a user runs it: it never sees this checkout's bare package folders
# (which a plain `python -m moshi_mlx.app` from the repository root would import instead of
# the installed package).
MOSHI_MLX = Path(sys.executable).with_name("moshi-mlx")

# A suite started in the background (`nohup pytest &` from a script) inherits SIGINT ignored,
# and so would every command it starts, which then cannot be interrupted as the Ctrl-C tests
# do it: the commands start with SIGINT as a terminal gives it.
signal.signal(signal.SIGINT, signal.default_int_handler)
# Likewise SIGHUP, which `nohup` leaves ignored for everything it starts.
signal.signal(signal.SIGHUP, signal.SIG_DFL)


def moshi_mlx_cmd(*args, **kwargs) -> subprocess.CompletedProcess:
    """Run the installed ``moshi-mlx`` with ``args``; output captured as text."""
    assert MOSHI_MLX.is_file(), f"{MOSHI_MLX} not found: install the project (pip install .)"
    return subprocess.run([str(MOSHI_MLX), *map(str, args)], capture_output=True, text=True,
                          **kwargs)  # fmt: skip


def run_python(code: str, **kwargs) -> subprocess.CompletedProcess:
    """``python -c code`` in a fresh interpreter, started outside the checkout (see above)."""
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=Path(__file__).parent, **kwargs)  # fmt: skip


def tmpfs(folder: Path, options: str):
    """A tmpfs mounted at ``folder`` for the test, or a skip where this machine cannot mount
    one (not root, or no tmpfs)."""
    folder.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)],
                       capture_output=True, text=True)  # fmt: skip
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs ({options}) here ({r.stderr.strip() or r.returncode})")
    try:
        yield folder
    finally:
        subprocess.run(["umount", str(folder)], check=True)


def train_spm(folder: Path, vocab_size: int = 32000) -> Path:
    """The library's small tokenizer (``moshi_mlx.random_weights.train_tokenizer``) as
    ``folder/spm.model``: Moshi's special ids, as many pieces as the fixture LM has text ids."""
    from moshi_mlx.random_weights import train_tokenizer

    folder.mkdir(parents=True, exist_ok=True)
    return train_tokenizer(folder / "spm.model", vocab_size)


@pytest.fixture(scope="session")
def mimi_io() -> dict[str, mx.array]:
    return mx.load(str(MIMI_DIR / "io.safetensors"))


@pytest.fixture(scope="session")
def lm_io() -> dict[str, mx.array]:
    return mx.load(str(LM_DIR / "io.safetensors"))


@pytest.fixture(scope="session")
def lm_config() -> dict:
    return json.loads((LM_DIR / "config.json").read_text())


@pytest.fixture(scope="session")
def spm_model(tmp_path_factory) -> Path:
    return train_spm(tmp_path_factory.mktemp("spm"))


@pytest.fixture(scope="session")
def pytorch_repo(tmp_path_factory, spm_model) -> Path:
    """A local folder laid out like ``kyutai/moshiko-pytorch-bf16`` but holding the fixtures:
    ``model.safetensors`` (LM), the Mimi checkpoint, the text tokenizer and ``config.json``.
    The Mimi here is the tiny fixture codec, so its config rides along as ``mimi_config.json``.
    """
    repo = tmp_path_factory.mktemp("moshiko-pytorch-fixture")
    shutil.copy(LM_DIR / "weights.safetensors", repo / "model.safetensors")
    shutil.copy(
        MIMI_DIR / "weights.safetensors", repo / "tokenizer-e351c8d8-checkpoint125.safetensors"
    )
    shutil.copy(spm_model, repo / "tokenizer_spm_32k_3.model")
    shutil.copy(LM_DIR / "config.json", repo / "config.json")
    shutil.copy(MIMI_DIR / "config.json", repo / "mimi_config.json")
    return repo


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory, pytorch_repo) -> Path:
    """The fixture model as ``moshi-mlx convert`` writes it (what chat and run load), in
    float32 (the reference's precision)."""
    from moshi_mlx.convert.convert import convert

    out = tmp_path_factory.mktemp("model") / "moshi-fixture"
    convert(pytorch_repo, out, dtype="float32", mimi_config=pytorch_repo / "mimi_config.json")
    return out


@pytest.fixture(scope="session")
def card(tmp_path_factory) -> dict[str, str]:
    """A virtual sound card of this test session's own (two suites running at once never
    share one), stopped when the session ends."""
    from audio_card import card_env, stop_card

    env = card_env(tmp_path_factory.mktemp("card"))
    yield env
    stop_card(env)


# ---- helpers of the safety tests (test_safety, test_hostile_files) ------------------------


def state(folder: Path) -> dict[str, str]:
    """Every entry below ``folder`` (hidden ones too) with a digest of its content."""
    out = {}
    for path in sorted(folder.rglob("*")):
        rel = str(path.relative_to(folder))
        if path.is_symlink():
            out[rel] = "-> " + os.readlink(path)
        elif path.is_file():
            out[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
        else:
            out[rel] = "dir" if path.is_dir() else "other"
    return out


def one_line_error(code: int, err: str, *words: str) -> str:
    lines = err.strip().splitlines()
    assert code == 1, (code, err)
    assert len(lines) == 1, err
    assert "Traceback" not in err
    assert lines[0].startswith("moshi-mlx "), lines
    for w in words:
        assert w in lines[0], (w, lines[0])
    return lines[0]


def cli(capsys, *argv) -> tuple[int, str]:
    """The command line in this process (fast); returns (exit code, stderr)."""
    from moshi_mlx.app.cli import main as cli_main

    code = cli_main([str(a) for a in argv])
    return code, capsys.readouterr().err


def speech_wav(path: Path, seconds: float = 0.4, rate: int = 24000) -> Path:
    from moshi_mlx.app.wavio import write_wav

    t = np.arange(int(seconds * rate)) / rate
    write_wav(path, (0.2 * np.sin(2 * np.pi * 220 * t)).astype(np.float32), rate)
    return path
