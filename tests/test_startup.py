"""Start-up: what a command imports before it answers, and how it stops while starting.

Behaviour only (which modules a fresh interpreter holds, what a command prints and in which
order); the times themselves are measured in docs/startup.md, never asserted.
"""

from __future__ import annotations

import importlib.util
import inspect
import json
import socket
import sys
from pathlib import Path

import pytest
from conftest import run_python

import moshi_mlx.mlx_lm_parts as parts

HEAVY = ("transformers", "mlx_lm")


def test_load_and_a_step_never_import_transformers(model_dir):
    r = run_python(f"""
import json, sys
import mlx.core as mx
import moshi_mlx

model = moshi_mlx.load({str(model_dir)!r})
gen = moshi_mlx.LmGen(model.lm, temp=0, temp_text=0, seed=1)
user = model.lm.cfg.n_q - model.lm.cfg.dep_q
for _ in range(3):
    out = gen.step(mx.zeros((1, user), mx.int32))
mx.eval(out)
print(json.dumps({{"offset": gen.offset, "shape": list(out.shape),
                  "loaded": sorted(m for m in sys.modules if m.split(".")[0] in {HEAVY!r})}}))
""")
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout)
    assert result["offset"] == 3 and result["shape"][0] == 1  # the steps ran
    assert result["loaded"] == [], f"the way to a conversation imported {result['loaded']}"


def test_the_helpers_are_mlx_lms_own_files():
    """Reused, not copied: the classes and functions come from the installed mlx-lm's files."""
    root = Path(importlib.util.find_spec("mlx_lm").submodule_search_locations[0])
    assert Path(inspect.getfile(parts.RotatingKVCache)) == root / "models" / "cache.py"
    assert Path(inspect.getfile(parts.ConcatenateKVCache)) == root / "models" / "cache.py"
    assert Path(inspect.getfile(parts.create_attention_mask)) == root / "models" / "base.py"
    assert Path(inspect.getfile(parts.apply_top_k)) == root / "sample_utils.py"


def test_mlx_lm_stays_whole_for_programs_that_import_it_too():
    """Loading mlx-lm's files under moshi_mlx leaves ``mlx_lm`` alone: imported before or
    after moshi_mlx, it is the whole package."""
    r = run_python("""
import moshi_mlx.lm, moshi_mlx.sampling
assert "mlx_lm" not in __import__("sys").modules
import mlx_lm
from mlx_lm.models.cache import RotatingKVCache
print(callable(mlx_lm.load), callable(mlx_lm.generate), RotatingKVCache.__module__)
""")
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["True", "True", "mlx_lm.models.cache"]


def test_flag_and_path_mistakes_are_answered_before_mlx_is_imported(tmp_path):
    wav = tmp_path / "in.wav"
    wav.write_bytes(b"RIFF")  # never read: the mistakes come first
    folder = tmp_path / "folder"
    folder.mkdir()
    cases = [
        (["run", wav, tmp_path / "o.wav", "--hf-path", tmp_path / "nowhere"], "no such folder"),
        (["run", wav, tmp_path / "o.wav", "--temp", "-1"], "--temp must be"),
        (["run", tmp_path / "missing.wav", tmp_path / "o.wav"], "no such file"),
        (["run", wav, tmp_path / "o.wav", "--voice-prompt", folder], "is a folder"),
        (["chat", "--hf-path", tmp_path / "nowhere"], "no such folder"),
        (["chat", "--max-lag-ms", "1"], "--max-lag-ms must be"),
        (["chat", "--top-p", "2"], "--top-p must be"),
        (["chat", "-q", "3"], "takes 4 or 8 bits"),
        (["chat", "--hfpath", "x"], "did you mean --hf-path?"),
        (["convert", "--mimi-weights", folder], "is a folder"),
        (["bench", "--mimi-weights", tmp_path / "missing"], "file not found"),
        (["chta"], "did you mean `moshi-mlx chat`?"),
    ]
    r = run_python(f"""
import contextlib, io, json, sys
from moshi_mlx.app.cli import main

for argv, words in {[([str(a) for a in argv], words) for argv, words in cases]!r}:
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        rc = main(argv)
    heavy = [m for m in ("mlx", "mlx.core", "sounddevice", "transformers") if m in sys.modules]
    print(json.dumps([argv, words, rc, err.getvalue(), heavy]))
""")
    assert r.returncode == 0, r.stderr
    for line in r.stdout.splitlines():
        argv, words, rc, err, heavy = json.loads(line)
        assert rc == 1 and words in err and len(err.splitlines()) == 1, (argv, err)
        assert heavy == [], f"{argv} imported {heavy} before answering"


@pytest.fixture
def silent_hub():
    """A Hugging Face endpoint that accepts connections and never answers: a download that
    hangs, as a slow network does."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    try:
        yield f"http://127.0.0.1:{server.getsockname()[1]}"
    finally:
        server.close()


def test_ctrl_c_while_chat_loads_stops_it_at_once_with_the_stop_said_last(
    card, silent_hub, tmp_path
):
    from audio_card import Chat

    env = {**card, "HF_ENDPOINT": silent_hub, "HF_HOME": str(tmp_path / "hf")}
    env.pop("HF_HUB_OFFLINE", None)
    chat = Chat(env, "--hf-path", "kyutai/moshiko-mlx-q4")
    try:
        chat.wait_for("fetching kyutai/moshiko-mlx-q4")  # stuck in the download
        rc = chat.interrupt(timeout=20)  # before: up to 30 s, the download's time
    finally:
        chat.kill()
    assert rc == 130, (chat.out, chat.err)
    assert chat.out[-1].endswith("stopped before the conversation started"), chat.out
    assert not any("Traceback" in line for line in chat.err), chat.err


if __name__ == "__main__":
    sys.exit(pytest.main([__file__]))
