"""One full-duplex frame of compute: user audio in, Moshi's audio and text out.

This is the loop body shared by the live chat, file-to-file inference and the benchmark; it
knows nothing about sound cards or terminals.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import numpy as np

from .errors import MoshiError
from .generate import LmGen
from .lm import Lm
from .mimi import Mimi


@dataclass
class FrameResult:
    pcm: np.ndarray | None  # Moshi's 1920 samples (float32), None while the delays fill
    text_id: int | None  # text token of the same frame, None while the delays fill
    user_codes: np.ndarray  # the user's codes Mimi produced for this frame, [n_user]
    codes: np.ndarray | None  # Moshi's audio codes decoded into ``pcm``, [dep_q]
    index: int = 0  # which input frame (0, 1, ... since the last reset) this is the answer to
    # Every stream's text token, [B] (a speech-to-text model takes a batch of frames), and the
    # extra heads' probabilities, [B, heads, classes]; None while the delays fill / no heads.
    text_ids: np.ndarray | None = None
    extra_heads: np.ndarray | None = None


class DuplexSession:
    """Mimi ``encode_step`` -> ``LmGen.step`` -> Mimi ``decode_step`` for one 1920-sample frame.

    Mimi runs on the device it was placed for (``Mimi.place``; MLX's default device if never
    placed), the LM on MLX's default device. All MLX work happens in the caller's thread;
    create and use a session on one thread.
    """

    def __init__(self, lm: Lm, mimi: Mimi, gen: LmGen):
        if mimi.sample_rate != 24000 or mimi.frame_size != 1920:
            raise MoshiError("Moshi needs the 24 kHz Mimi with 1920-sample frames")
        self.lm, self.mimi, self.gen = lm, mimi, gen
        self.n_user = lm.cfg.n_user
        mimi.set_num_codebooks(lm.cfg.mimi_codebooks)
        self.frame_size = mimi.frame_size
        self.mimi_device = getattr(mimi, "device", None) or mx.default_device()
        self.frames = 0

    def reset(self) -> None:
        self.mimi.reset()
        self.gen.reset()
        self.frames = 0

    def check_pcm(self, pcm) -> None:
        """``pcm`` must be one frame of audio: a float numpy array of 1920 samples (or, for a
        speech-to-text model, ``[batch, 1920]``: one frame of each stream)."""
        batch = isinstance(pcm, np.ndarray) and pcm.ndim == 2 and self.lm.cfg.is_stt
        size = pcm.shape[-1] if batch else getattr(pcm, "size", None)
        if not isinstance(pcm, np.ndarray) or pcm.dtype.kind != "f" or size != self.frame_size:
            raise MoshiError(
                f"`pcm` must be a float numpy array of {self.frame_size} samples, got "
                f"{getattr(pcm, 'shape', type(pcm).__name__)}"
            )

    def encode(self, pcm: np.ndarray) -> mx.array:
        """One frame of user audio ``[1920]`` (or ``[B, 1920]``) -> the user's codes ``[B,
        n_user]`` (lazy)."""
        self.check_pcm(pcm)
        x = mx.array(np.asarray(pcm, dtype=np.float32).reshape(-1, 1, self.frame_size))
        with mx.stream(self.mimi_device):
            return self.mimi.encode_step(x)[:, : self.n_user, 0]

    def decode(self, codes: mx.array) -> mx.array:
        """Moshi's audio codes ``[1, dep_q]`` -> its 1920 samples (lazy)."""
        with mx.stream(self.mimi_device):
            return self.mimi.decode_step(codes[:, :, None], check=False)[0, 0]

    def step(self, pcm: np.ndarray) -> FrameResult:
        """Process one frame of user audio (``[1920]`` float32 at 24 kHz)."""
        user = self.encode(pcm)  # checks ``pcm`` first
        index, self.frames = self.frames, self.frames + 1
        # Codes from Mimi are valid by construction: no host check, one evaluation per frame.
        out = self.gen.step(user, check=False)
        if out is None:
            return FrameResult(None, None, np.array(user[0]), None, index)
        heads = self.gen.last_extra_heads
        if self.lm.cfg.is_stt:  # text only: nothing to decode
            return frame_result(None, np.array(out), np.array(user), heads, index)
        pcm_out = self.decode(out[:, 1:])
        mx.eval(pcm_out, out, user)
        return frame_result(np.array(pcm_out), np.array(out), np.array(user), heads, index)


def frame_result(pcm, out: np.ndarray, user: np.ndarray, heads, index: int) -> FrameResult:
    """The ``FrameResult`` of the LM's tokens ``out`` ``[B, 1 + dep_q]``."""
    heads = None if heads is None else np.array(heads)
    return FrameResult(pcm, int(out[0, 0]), user[0], out[0, 1:], index, out[:, 0], heads)
