"""WAV files in and out, and resampling, with numpy only.

``WavReader`` streams the common WAV flavours (8/16/24/32-bit PCM, 32/64-bit float, plain or
WAVE_FORMAT_EXTENSIBLE headers): the header is checked first (an impossible rate, channel count
or block size is one line of error; a file shorter than its header says is read with a one-line
warning), then blocks are read as they are needed, so a long file never sits in memory whole.
``WavWriter`` writes 16-bit PCM whose header is kept valid as the file grows, so a process
killed while writing leaves a playable file missing at most its last second; ``AtomicWav``
writes one under a temporary name renamed into place at the end. ``resample`` changes the
sample rate of a whole signal (band-limited, Kaiser-windowed sinc interpolation).
"""

from __future__ import annotations

import math
import os
import struct
import warnings
from pathlib import Path

import numpy as np

from moshi_mlx.errors import MoshiError, MoshiWarning
from moshi_mlx.outputs import Output, check_output, create_in_place, open_input

from .resample import kaiser_sinc_bank

_PCM, _FLOAT, _EXTENSIBLE = 1, 3, 0xFFFE
RATES = (1000, 768_000)  # sample rates a WAV header may claim
MAX_CHANNELS = 64
FIX = "convert it first, e.g. ffmpeg -i {name} -c:a pcm_s16le input.wav"


class WavError(MoshiError):
    """A file that is not a WAV this module can read; the message is one line."""


class WavReader:
    """A WAV file read block by block: ``rate``, ``channels``, ``frames`` (what the file holds)
    and ``read(n)`` -> ``[<= n, channels]`` float32 in [-1, 1] (empty at the end)."""

    def __init__(self, path: str | Path):
        self.path = path = Path(path)
        try:
            self._file = open_input(path, "the WAV file")
        except MoshiError as e:
            raise WavError(str(e)) from None
        try:
            self._parse(os.fstat(self._file.fileno()).st_size)
        except BaseException:
            self._file.close()
            raise

    def _parse(self, size: int) -> None:
        path, f = self.path, self._file
        head = f.read(12)
        if len(head) < 12 or head[:4] != b"RIFF" or head[8:] != b"WAVE":
            raise WavError(f"{path} is not a WAV file; " + FIX.format(name=path.name))
        fmt = None
        while True:
            chunk = f.read(8)
            if len(chunk) < 8:
                raise WavError(
                    f"{path}: broken WAV file (no {'fmt' if fmt is None else 'data'} chunk)"
                )
            cid, length = chunk[:4], struct.unpack("<I", chunk[4:])[0]
            if cid == b"data":
                break
            if cid == b"fmt ":
                body = f.read(length)
                if len(body) < 16:
                    raise WavError(f"{path}: broken WAV header (fmt chunk of {len(body)} bytes)")
                fmt = struct.unpack("<HHIIHH", body[:16])
                if fmt[0] == _EXTENSIBLE and len(body) >= 26:
                    fmt = (struct.unpack("<H", body[24:26])[0],) + fmt[1:]
                f.seek(length & 1, os.SEEK_CUR)
            else:
                f.seek(length + (length & 1), os.SEEK_CUR)
        if fmt is None:
            raise WavError(f"{path}: broken WAV file (its data comes before its format)")
        tag, channels, rate, _, align, bits = fmt
        if not 1 <= channels <= MAX_CHANNELS:
            raise WavError(f"{path}: broken WAV header ({channels} channels)")
        if not RATES[0] <= rate <= RATES[1]:
            raise WavError(f"{path}: broken WAV header (a sample rate of {rate} Hz)")
        supported = bits in ((32, 64) if tag == _FLOAT else (8, 16, 24, 32) if tag == _PCM else ())
        if not supported:
            raise WavError(
                f"{path}: unsupported WAV encoding (format {tag:#x}, {bits} bit); "
                + FIX.format(name=path.name)
            )
        if align != channels * bits // 8:
            raise WavError(f"{path}: broken WAV header (blocks of {align} bytes for {channels} "
                           f"channels of {bits} bit)")  # fmt: skip
        self.rate, self.channels, self._tag, self._bits, self._align = (
            rate,
            channels,
            tag,
            bits,
            align,
        )
        there = size - f.tell()
        if length > there:
            warnings.warn(
                f"{path} is shorter than its header says: reading the "
                f"{there // align / rate:.2f} s that are there",
                MoshiWarning,
                stacklevel=3,
            )
        self.frames = min(length, there) // align
        self._left = self.frames

    def read(self, n: int | None = None) -> np.ndarray:
        n = self._left if n is None else min(n, self._left)
        raw = self._file.read(n * self._align)
        n = len(raw) // self._align
        self._left -= n
        x = _decode(raw[: n * self._align], self._tag, self._bits)
        return x.reshape(n, self.channels)

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> WavReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_wav(path: str | Path) -> tuple[np.ndarray, int]:
    """A whole WAV file: ``(samples [frames, channels] float32 in [-1, 1], sample_rate)``."""
    with WavReader(path) as r:
        return r.read(), r.rate


def _decode(raw: bytes, tag: int, bits: int) -> np.ndarray:
    if tag == _FLOAT:
        x = np.frombuffer(raw, f"<f{bits // 8}")
        return np.clip(np.nan_to_num(x.astype(np.float32)), -1.0, 1.0)
    if bits == 8:  # unsigned
        return (np.frombuffer(raw, np.uint8).astype(np.float32) - 128.0) / 128.0
    if bits == 24:
        b = np.frombuffer(raw, np.uint8).reshape(-1, 3).astype(np.int32)
        v = b[:, 0] | (b[:, 1] << 8) | (b[:, 2] << 16)
        v = np.where(v >= 1 << 23, v - (1 << 24), v)
        return v.astype(np.float32) / float(1 << 23)
    v = np.frombuffer(raw, f"<i{bits // 8}")
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


class WavWriter:
    """16-bit PCM WAV written to the binary file ``file`` as samples come; the header's sizes
    are updated every ``sync_s`` seconds of audio (and at ``close``), so that the file is a
    playable WAV of what was written up to then, whatever happens to the process."""

    def __init__(self, file, channels: int, sample_rate: int, sync_s: float = 1.0):
        self.file, self.channels, self.rate = file, channels, sample_rate
        self.frames = 0
        self._sync_every = max(1, int(sync_s * sample_rate))
        self._synced = 0
        self._header()

    def _header(self) -> None:
        data = self.frames * self.channels * 2
        block = self.channels * 2
        self.file.write(
            b"RIFF" + struct.pack("<I", 36 + data) + b"WAVE"
            + b"fmt " + struct.pack("<IHHIIHH", 16, _PCM, self.channels, self.rate,
                                    self.rate * block, block, 16)
            + b"data" + struct.pack("<I", data)
        )  # fmt: skip

    def _sync(self) -> None:
        end = self.file.tell()
        self.file.seek(0)
        self._header()
        self.file.seek(end)
        self.file.flush()
        self._synced = self.frames

    def write(self, samples: np.ndarray) -> None:
        """Append ``[frames, channels]`` float samples."""
        self.file.write(to_int16(samples).tobytes())
        self.frames += len(samples)
        if self.frames - self._synced >= self._sync_every:
            self._sync()

    def close(self) -> None:
        self._sync()
        os.fsync(self.file.fileno())
        self.file.close()


class AtomicWav(WavWriter):
    """A ``WavWriter`` on a temporary file beside ``path``, moved to ``path`` by ``close()``;
    ``discard()`` removes it instead. ``path`` follows the output rule
    (``moshi_mlx.outputs.Output``: ``force`` and ``rule`` are its arguments, ``.wav`` its
    suffix); the temporary of a killed process is removed by the next writer to ``path``."""

    def __init__(self, path: str | Path, channels: int, sample_rate: int, force: bool = True,
                 **rule):  # fmt: skip
        self.output = Output(path, force=force, suffix=".wav", kind="a WAV file", **rule)
        self.path = self.output.path
        self.tmp = self.output.start()
        try:
            super().__init__(open(self.tmp, "xb"), channels, sample_rate)
        except BaseException:
            self.output.discard()
            raise

    def close(self) -> Path:
        try:
            super().close()
        except BaseException:
            self.discard()
            raise
        return self.output.commit()

    def discard(self) -> None:
        try:
            self.file.close()
        except (OSError, AttributeError):  # a buffer that cannot be written (a full disk)
            pass
        self.output.discard()

    def __enter__(self) -> AtomicWav:
        return self

    def __exit__(self, exc_type, *_):
        if exc_type is None:
            self.close()
        else:
            self.discard()


def check_writable(path: str | Path, force: bool = False, **rule) -> Path:
    """Check, before any slow work, that a new file can be written at ``path`` under the output
    rule (``moshi_mlx.outputs.check_output``). One line naming the problem otherwise."""
    return check_output(path, force=force, **rule)


def create(path: str | Path, force: bool = False, **rule):
    """Open a new file at ``path`` itself for writing (binary), under the output rule; the open
    never follows a link, nor replaces a file that appeared since unless ``force``."""
    return create_in_place(path, force=force, **rule)


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
