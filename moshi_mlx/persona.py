"""NVIDIA PersonaPlex's prompts, ready for ``LmGen.system_prompt``: the text prompt as token ids,
the voice prompt as Mimi codes of a recording of the voice, and voice prompts saved to and
loaded from safetensors files.

    codes = persona.voice_prompt_from_pcm(mimi, pcm, 24000)  # or load_voice_prompt(path, mimi)
    gen.system_prompt(codes, persona.text_prompt_tokens(tokenizer, "You are a ..."))
"""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import numpy as np

from . import validate
from .errors import MoshiError
from .lm import LmConfig
from .loudness import normalize_loudness
from .mimi import Mimi

VOICE_PROMPT_LUFS = -24.0  # NVIDIA normalises the voice recording to this before encoding
VOICE_PROMPT_FORMAT = "moshi-mlx.voice-prompt.v1"
VOICE_PROMPT_CODEBOOKS = 8  # Moshi's audio stream


def is_persona_model(lm) -> bool:
    """Whether the LM was trained for system prompts (PersonaPlex: its config says so, or its
    depformer also predicts the user's stream). Prompting another model works but is not
    what it was trained for; ``LmGen.system_prompt`` warns then."""
    validate.instance("lm.cfg", getattr(lm, "cfg", None), LmConfig, "an LmConfig (`lm` an Lm)")
    return lm.cfg.persona


def wrap_with_system_tags(text: str) -> str:
    """The text prompt as PersonaPlex was trained on it: ``<system> ... <system>`` around the
    stripped text, unless it already starts and ends with the tag."""
    text = text.strip()
    if text.startswith("<system>") and text.endswith("<system>"):
        return text
    return f"<system> {text} <system>"


def text_prompt_tokens(tokenizer, text: str) -> list[int]:
    """Token ids of a text prompt (``tokenizer``: the model's SentencePiece processor)."""
    text = validate.text("text", text)
    if not callable(getattr(tokenizer, "encode", None)):
        raise MoshiError(f"`tokenizer` must be a SentencePiece processor, got {tokenizer!r}")
    return list(tokenizer.encode(wrap_with_system_tags(text)))


def voice_prompt_from_pcm(mimi, pcm: np.ndarray, sample_rate: int) -> mx.array:
    """Mimi codes ``[1, 8, F]`` of a recording of the voice, prepared as NVIDIA does.

    ``pcm``: mono float samples ``[T]`` at Mimi's rate (24 kHz; resample first). The audio is
    normalised to -24 LUFS, cut into 1920-sample frames (the last one zero-padded, as NVIDIA
    pads it, so ``F = ceil(T / 1920)``) and encoded frame by frame with ``encode_step`` from a
    fresh stream. Mimi is reset before and after: the conversation's stream starts fresh.
    """
    validate.instance("mimi", mimi, Mimi, "a Mimi")
    if sample_rate != mimi.sample_rate:
        raise MoshiError(
            f"the voice recording is at {sample_rate} Hz; resample it to {mimi.sample_rate} Hz"
        )
    if mimi.num_codebooks < VOICE_PROMPT_CODEBOOKS:
        raise MoshiError(
            f"Mimi encodes {mimi.num_codebooks} codebooks; a voice prompt needs "
            f"{VOICE_PROMPT_CODEBOOKS} (mimi.set_num_codebooks)"
        )
    pcm = np.asarray(pcm)
    if pcm.ndim != 1 or pcm.size == 0:
        raise MoshiError(f"the voice recording must be mono samples [T], got {list(pcm.shape)}")
    pcm = normalize_loudness(pcm, sample_rate, VOICE_PROMPT_LUFS)
    frame = mimi.frame_size
    pcm = np.pad(pcm, (0, -pcm.size % frame))
    mimi.reset()
    try:
        codes = [
            mimi.encode_step(mx.array(pcm[i : i + frame])[None, None])
            for i in range(0, pcm.size, frame)
        ]
        codes = mx.concatenate(codes, axis=2)[:, :VOICE_PROMPT_CODEBOOKS]
        mx.eval(codes)
    finally:
        mimi.reset()
    return codes


def _codec(mimi) -> dict[str, str]:
    """What a voice prompt file records of the codec it was made with."""
    return {
        "sample_rate": str(mimi.sample_rate),
        "frame_size": str(mimi.frame_size),
        "card": str(mimi.cfg.bins),
    }


def save_voice_prompt(path: str | Path, codes: mx.array, mimi) -> None:
    """Save voice-prompt codes ``[1, 8, F]`` (``voice_prompt_from_pcm``) as safetensors, with a
    format tag and what ``load_voice_prompt`` checks of the codec (``mimi``) they belong to."""
    path = validate.path("path", path)
    validate.instance("mimi", mimi, Mimi, "a Mimi")
    validate.instance("codes", codes, (mx.array, np.ndarray), "an integer mx.array")
    codes = mx.array(codes)
    if codes.ndim != 3 or codes.shape[:2] != (1, VOICE_PROMPT_CODEBOOKS):
        raise MoshiError(
            f"voice prompt codes must be [1, {VOICE_PROMPT_CODEBOOKS}, frames], got "
            f"{list(codes.shape)}"
        )
    bins = mimi.cfg.bins
    ok = mx.issubdtype(codes.dtype, mx.integer) and codes.size > 0
    if not ok or mx.min(codes).item() < 0 or mx.max(codes).item() >= bins:
        raise MoshiError(f"voice prompt codes must be integers in [0, {bins}), at least one frame")
    from safetensors.numpy import save_file

    metadata = {"format": VOICE_PROMPT_FORMAT, **_codec(mimi)}
    # safetensors writes exactly ``path`` (MLX's writer would append ".safetensors")
    save_file({"codes": np.array(codes.astype(mx.int32))}, str(path), metadata=metadata)


def load_voice_prompt(path: str | Path, mimi) -> mx.array:
    """Voice-prompt codes ``[1, 8, F]`` saved by ``save_voice_prompt``; refuses files made for
    another codec than ``mimi``, files of another kind, and NVIDIA's ``.pt`` voice files."""
    path = validate.path("path", path)
    validate.instance("mimi", mimi, Mimi, "a Mimi")
    if path.suffix == ".pt":
        raise MoshiError(
            f"{path}: NVIDIA's .pt voice prompts are torch pickles, which we never load; make "
            "a voice prompt from a WAV of the voice instead (persona.voice_prompt_from_pcm, then "
            "persona.save_voice_prompt)"
        )
    if not path.is_file():
        raise MoshiError(f"voice prompt not found: {path}")
    try:
        tensors, metadata = mx.load(str(path), format="safetensors", return_metadata=True)
    except Exception:  # MLX raises RuntimeError/ValueError with C++ details
        raise MoshiError(f"{path} is not a safetensors file (not a voice prompt)") from None
    if metadata.get("format") != VOICE_PROMPT_FORMAT or set(tensors) != {"codes"}:
        raise MoshiError(f"{path} is not a voice prompt made by save_voice_prompt")
    wanted = _codec(mimi)
    differ = [f"{k} {metadata.get(k)} (this Mimi: {v})" for k, v in wanted.items()
              if metadata.get(k) != v]  # fmt: skip
    if differ:
        raise MoshiError(f"{path} was made for another codec: {', '.join(differ)}")
    codes = tensors["codes"]
    if codes.ndim != 3 or codes.shape[:2] != (1, VOICE_PROMPT_CODEBOOKS):
        raise MoshiError(f"{path}: codes have shape {list(codes.shape)}, not [1, 8, frames]")
    return codes
