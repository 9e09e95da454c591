"""Kyutai's command-line client (``python -m moshi.client`` of PyPI's ``moshi``, its code
unchanged) against ``moshi-mlx serve``, on a private virtual sound card
(``scripts/audio_env.sh``): run by ``scripts/kyutai_client_check.sh --cli`` (read its header).

The card's microphone plays voice-like audio; the client records it, sends it as Ogg Opus,
plays Moshi's answer on the card's speaker and prints Moshi's text. Checks:

- the client connects and prints Moshi's text;
- the client's audio reaches the server (the server's ``--record-dir`` recording, channel 1);
- Moshi's audio reaches the card's speaker through the client, at the level of the server's own
  frames above 100 Hz (Opus drops the DC and the lowest band; the fixture model's output has
  a large DC offset) within 3 dB;
- a second client while the first talks is turned away at once (the server's error message,
  which this client shows as ``unknown message kind 5``, then the close), instead of waiting.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import wave
from pathlib import Path

import numpy as np
from kyutai_client_check import start_server, stop_server

ROOT = Path(__file__).resolve().parents[1]
RATE = 24000
FRAME = 1920


def client_python(folder: Path) -> tuple[str, Path]:
    """A throwaway venv with PyPI's ``moshi`` (without its torch dependencies: the client
    needs only aiohttp, numpy, sphn and sounddevice, at moshi's own pins), and a folder
    holding its ``client.py`` and ``client_utils.py`` as they are, in a ``moshi`` package
    whose ``__init__`` is empty (moshi's own imports torch for its models)."""
    venv = folder / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(venv / "bin" / "pip"), "install", "-q"]
    subprocess.run([*pip, "--no-deps", "moshi"], check=True)
    subprocess.run([*pip, "aiohttp>=3.10.5,<3.12", "sphn>=0.2.0,<0.3.0", "sounddevice==0.5",
                    "numpy>=1.26,<2.3"], check=True)  # fmt: skip
    python = str(venv / "bin" / "python")
    where = subprocess.run(
        [python, "-c", "import importlib.util as u, importlib.metadata as m; "
         "print(u.find_spec('moshi').submodule_search_locations[0], m.version('moshi'))"],
        check=True, capture_output=True, text=True,
    ).stdout.split()  # fmt: skip
    package = folder / "client" / "moshi"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    for name in ("client.py", "client_utils.py"):
        (package / name).write_bytes((Path(where[0]) / name).read_bytes())
    print(f"Kyutai's client: moshi {where[1]} from PyPI ({where[0]})", flush=True)
    return python, package.parent


def card(folder: Path) -> dict[str, str]:
    env = {**os.environ, "AUDIO_ENV_DIR": str(folder)}
    script = str(ROOT / "scripts" / "audio_env.sh")
    subprocess.run([script, "start"], env=env, check=True)
    lines = subprocess.run([script, "env"], env=env, check=True, capture_output=True, text=True)
    env.update(re.findall(r"^export (\w+)=(.*)$", lines.stdout, re.M))
    return env


def rms(x: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.square(x, dtype=np.float64)))) if len(x) else 0.0


def above_100hz(x: np.ndarray) -> np.ndarray:
    spectrum = np.fft.rfft(x)
    spectrum[np.fft.rfftfreq(len(x), 1 / RATE) < 100] = 0
    return np.fft.irfft(spectrum, len(x))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", type=Path, help="a model folder `moshi-mlx serve --hf-path` takes")
    ap.add_argument("--moshi-mlx", default=str(ROOT / ".venv" / "bin" / "moshi-mlx"))
    ap.add_argument("--seconds", type=float, default=15.0, help="how long the client talks")
    args = ap.parse_args()
    failed = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        python, client_dir = client_python(tmp)
        env = card(tmp / "card")
        t = np.arange(int((args.seconds + 10) * RATE)) / RATE
        f = 180 + 60 * np.sin(2 * np.pi * 0.7 * t)
        voice = 0.3 * np.sin(2 * np.pi * np.cumsum(f) / RATE) * (0.6 + 0.4 * np.sin(8 * np.pi * t))
        voice.astype("<f4").tofile(tmp / "mic.raw")
        procs = []
        server, url = start_server(args.moshi_mlx, None, args.model,
                                   ["--record-dir", str(tmp / "rec")], env=env)  # fmt: skip
        port = url.rsplit(":", 1)[1].strip("/")
        client_cmd = [python, "-m", "moshi.client", "--host", "localhost", "--port", port]
        try:
            bus = open(tmp / "bus.raw", "wb")
            procs.append(subprocess.Popen(["parecord", "--raw", "--format=float32le",
                                           f"--rate={RATE}", "--channels=2", "-d",
                                           "bus.monitor"], stdout=bus, env=env))  # fmt: skip
            client = subprocess.Popen(client_cmd, cwd=client_dir, env=env, text=True,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
            time.sleep(2)
            procs.append(subprocess.Popen(["pacat", "--raw", "--format=float32le",
                                           f"--rate={RATE}", "--channels=1", "-d", "micfeed",
                                           str(tmp / "mic.raw")], env=env))  # fmt: skip
            time.sleep(3)
            second = subprocess.run(client_cmd, cwd=client_dir, env=env, capture_output=True,
                                    text=True, timeout=30)  # fmt: skip
            print(f"second client (exit {second.returncode}): "
                  + " | ".join(second.stderr.split("\n")[:4]), flush=True)  # fmt: skip
            if "unknown message kind 5" not in second.stderr:
                failed.append("the second client was not turned away with an error message")
            time.sleep(max(args.seconds - 5, 1))
            client.send_signal(signal.SIGINT)  # as Ctrl-C in its terminal
            out, err = client.communicate(timeout=30)
        finally:
            for p in procs:
                p.terminate()
                p.wait()
            code = stop_server(server)
            subprocess.run([str(ROOT / "scripts" / "audio_env.sh"), "stop"], env=env)
        print(f"client exit={client.returncode} server exit={code}")
        lines = [ln for ln in err.replace("\r", "\n").split("\n") if ln.strip()]
        kinds = sorted(set(re.findall(r"unknown message kind (\d+)", err)))
        print(f"client log: {len(lines)} lines, 'unknown message kind' for kinds {kinds}")
        for line in lines:
            if "unknown message kind" not in line and "[LAG]" not in line:
                print(f"  {line}")
        print(f"client text: {out[:160]!r}")
        if not out.split():
            failed.append("the client printed no text")
        if "Traceback" in err or "connected!" not in err:
            failed.append("the client did not connect, or failed")
        recording = next((tmp / "rec").glob("*.wav"), None)
        if recording is None:
            failed.append("no recording on the server: no conversation")
        else:
            with wave.open(str(recording)) as w:
                pcm = np.frombuffer(w.readframes(w.getnframes()), "<i2").reshape(-1, 2) / 32768
            speaker = np.fromfile(tmp / "bus.raw", "<f4").reshape(-1, 2)[:, 1]
            blocks = speaker[: len(speaker) // FRAME * FRAME].reshape(-1, FRAME)
            heard = blocks[np.sqrt(np.mean(blocks**2, axis=1)) > 0.01]
            mic_rms, moshi_rms, played_rms = rms(pcm[:, 0]), rms(above_100hz(pcm[:, 1])), rms(heard)
            print(f"server heard the client's microphone: rms {mic_rms:.3f} "
                  f"({len(pcm) / RATE:.1f} s recorded)")  # fmt: skip
            print(f"Moshi's frames on the server, above 100 Hz: rms {moshi_rms:.3f}; played by "
                  f"the client on the speaker: {len(heard)} frames of 80 ms, rms "
                  f"{played_rms:.3f}")  # fmt: skip
            if mic_rms < 0.05:
                failed.append("the client's microphone did not reach the server")
            if len(heard) < 20 or abs(20 * np.log10(max(played_rms, 1e-9) / moshi_rms)) > 3:
                failed.append("Moshi's audio did not reach the speaker through the client")
        if client.returncode != 0 or code not in (0, 130):
            failed.append("the client or the server did not exit cleanly")
    for line in failed:
        print(f"FAILED: {line}")
    print("kyutai_cli_check: " + ("FAILED" if failed else "all checks passed"))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
