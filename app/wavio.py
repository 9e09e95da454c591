"""WAV files in and out, and resampling, with numpy only.

``read_wav`` reads the common WAV flavours (8/16/24/32-bit PCM, 32/64-bit float, plain or
WAVE_FORMAT_EXTENSIBLE headers); ``write_wav`` writes 16-bit PCM through a temporary file that
is renamed into place, so a reader never sees a half-written file; ``resample`` changes the
sample rate by band-limited (Kaiser-windowed sinc) interpolation.
"""

from __future__ import annotations

import math
import os
import secrets
import struct
import wave
from pathlib import Path

import numpy as np

from moshi_mlx.errors import MoshiError

from .resample import kaiser_sinc_bank

_PCM, _FLOAT, _EXTENSIBLE = 1, 3, 0xFFFE


class WavError(MoshiError):
    """A file that is not a WAV this module can read; the message is one line."""


def read_wav(path: str | Path) -> tuple[np.ndarray, int]:
    """``(samples [frames, channels] float32 in [-1, 1], sample_rate)``."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise WavError(f"{path}: no such file") from None
    except OSError as e:
        raise WavError(f"{path}: cannot read ({e.strerror})") from None
    if len(data) < 12 or data[:4] != b"RIFF" or data[8:12] != b"WAVE":
        raise WavError(
            f"{path} is not a WAV file; convert it first, e.g. ffmpeg -i {path.name} input.wav"
        )
    fmt = None
    samples = None
    pos = 12
    while pos + 8 <= len(data):
        cid, size = data[pos : pos + 4], struct.unpack("<I", data[pos + 4 : pos + 8])[0]
        body = data[pos + 8 : pos + 8 + size]
        if cid == b"fmt ":
            if len(body) < 16:
                raise WavError(f"{path}: broken WAV header (fmt chunk of {len(body)} bytes)")
            fmt = struct.unpack("<HHIIHH", body[:16])
            if fmt[0] == _EXTENSIBLE and len(body) >= 26:
                fmt = (struct.unpack("<H", body[24:26])[0],) + fmt[1:]
        elif cid == b"data":
            samples = body  # a truncated file keeps what is there
        pos += 8 + size + (size & 1)
    if fmt is None or samples is None:
        raise WavError(f"{path}: broken WAV file (no {'fmt' if fmt is None else 'data'} chunk)")
    tag, channels, rate, _, _, bits = fmt
    if channels < 1 or rate < 1:
        raise WavError(f"{path}: broken WAV header ({channels} channels at {rate} Hz)")
    x = _decode(samples, tag, bits, path)
    x = x[: len(x) // channels * channels].reshape(-1, channels)
    return x, rate


def _decode(raw: bytes, tag: int, bits: int, path: Path) -> np.ndarray:
    if tag == _FLOAT and bits in (32, 64):
        x = np.frombuffer(raw[: len(raw) // (bits // 8) * (bits // 8)], f"<f{bits // 8}")
        return np.nan_to_num(x.astype(np.float32))
    if tag != _PCM or bits not in (8, 16, 24, 32):
        raise WavError(
            f"{path}: unsupported WAV encoding (format {tag:#x}, {bits} bit); "
            f"use PCM or float, e.g. ffmpeg -i {path.name} -c:a pcm_s16le input.wav"
        )
    if bits == 8:  # unsigned
        return (np.frombuffer(raw, np.uint8).astype(np.float32) - 128.0) / 128.0
    if bits == 24:
        b = np.frombuffer(raw[: len(raw) // 3 * 3], np.uint8).reshape(-1, 3).astype(np.int32)
        v = b[:, 0] | (b[:, 1] << 8) | (b[:, 2] << 16)
        v = np.where(v >= 1 << 23, v - (1 << 24), v)
        return v.astype(np.float32) / float(1 << 23)
    width = bits // 8
    v = np.frombuffer(raw[: len(raw) // width * width], f"<i{width}")
    return (v.astype(np.float64) / float(1 << (bits - 1))).astype(np.float32)


def to_int16(x: np.ndarray) -> np.ndarray:
    return (np.clip(np.asarray(x, np.float32), -1.0, 1.0) * 32767.0).round().astype("<i2")


def write_wav(path: str | Path, samples: np.ndarray, sample_rate: int) -> None:
    """Write ``samples`` (``[frames]`` or ``[frames, channels]`` float in [-1, 1]) as 16-bit
    PCM; the file appears at ``path`` only once complete."""
    x = np.asarray(samples, np.float32)
    x = x[:, None] if x.ndim == 1 else x
    with AtomicWav(path, x.shape[1], sample_rate) as w:
        w.write(x)


class AtomicWav:
    """A 16-bit PCM WAV written progressively into a temporary file beside ``path`` and renamed
    to ``path`` by ``close()``; ``discard()`` removes it instead."""

    def __init__(self, path: str | Path, channels: int, sample_rate: int):
        self.path = Path(path)
        self.tmp = temp_beside(self.path)
        self.frames = 0
        self._file = open(self.tmp, "xb")
        self._w = wave.open(self._file, "wb")
        self._w.setnchannels(channels)
        self._w.setsampwidth(2)
        self._w.setframerate(sample_rate)

    def write(self, samples: np.ndarray) -> None:
        """Append ``[frames, channels]`` float samples."""
        self._w.writeframesraw(to_int16(samples).tobytes())
        self.frames += len(samples)

    def close(self) -> Path:
        self._w.close()  # patches the header's sizes
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        os.replace(self.tmp, self.path)
        return self.path

    def discard(self) -> None:
        self._w.close()
        self._file.close()
        self.tmp.unlink(missing_ok=True)

    def __enter__(self) -> AtomicWav:
        return self

    def __exit__(self, exc_type, *_):
        if exc_type is None:
            self.close()
        else:
            self.discard()


def write_text(path: str | Path, text: str) -> None:
    """Write a text file through a temporary file renamed into place."""
    path = Path(path)
    tmp = temp_beside(path)
    with open(tmp, "x", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


def temp_beside(path: Path) -> Path:
    """A fresh hidden name in ``path``'s folder, for a file renamed to ``path`` once written
    (same filesystem, so the rename is atomic; created with the usual permissions)."""
    return path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")


def to_mono(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float32)
    return x.mean(axis=1, dtype=np.float32) if x.ndim == 2 else x


def resample(
    x: np.ndarray, rate_in: int, rate_out: int, half_taps: int = 24, beta: float = 8.0
) -> np.ndarray:
    """Resample mono ``x`` from ``rate_in`` to ``rate_out`` Hz (any pair of integer rates).

    Each output sample is a Kaiser-windowed sinc interpolation of the input, with the cut-off
    a little below the lower of the two Nyquist frequencies (downsampling does not alias);
    ``half_taps`` zero crossings on each side. Output sample ``n`` sits at input position
    ``n * rate_in / rate_out``; returns float32 of ``round(len(x) * rate_out / rate_in)``.
    """
    x = np.asarray(x, np.float64).reshape(-1)
    if rate_in == rate_out or len(x) == 0:
        return x.astype(np.float32)
    g = math.gcd(int(rate_in), int(rate_out))
    up, down = rate_out // g, rate_in // g  # output n <-> input position n * down / up
    n_out = int(round(len(x) * up / down))
    reach, bank = kaiser_sinc_bank(up, down, half_taps, beta)
    padded = np.concatenate([np.zeros(reach), x, np.zeros(reach + 1)])
    windows = np.lib.stride_tricks.sliding_window_view(padded, 2 * reach + 1)
    out = np.empty(n_out, np.float32)
    inverse = pow(down, -1, up)
    # Polyphase: the weights depend only on n * down mod up, so there are ``up`` filters and
    # the outputs of one phase read the input at a constant stride of ``down``.
    for phase in range(up):
        first = phase * inverse % up  # smallest n with n * down = phase (mod up)
        if first >= n_out:
            continue
        starts = (np.arange(first, n_out, up) * down) // up  # floor of the input positions
        out[first::up] = windows[starts] @ bank[phase]
    return out
