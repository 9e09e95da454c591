"""NVIDIA PersonaPlex's prompts, ready for ``LmGen.system_prompt``: the text prompt as token ids,
the voice prompt as Mimi codes of a recording of the voice, and voice prompts saved to and
loaded from safetensors files.

    codes = persona.voice_prompt_from_pcm(mimi, pcm, 24000)  # or load_voice_prompt(path, mimi)
    gen.system_prompt(codes, persona.text_prompt_tokens(tokenizer, "You are a ..."))
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from . import validate
from .errors import MoshiError

if TYPE_CHECKING:
    import mlx.core as mx

VOICE_PROMPT_LUFS = -24.0  # NVIDIA normalises the voice recording to this before encoding
VOICE_PROMPT_FORMAT = "moshi-mlx.voice-prompt.v1"
VOICE_PROMPT_CODEBOOKS = 8  # Moshi's audio stream
# A prompt is teacher-forced frame by frame into the LM's 3000-frame (240 s) context and must
# stay well inside it: a voice prompt needs a few seconds of the voice, a role a paragraph.
MAX_VOICE_S = 30.0
MAX_VOICE_FRAMES = 375  # MAX_VOICE_S at 12.5 frames per second
MAX_TEXT_CHARS = 5000  # checked before tokenizing
MAX_TEXT_TOKENS = 500  # one frame each: 40 s of context


def is_persona_model(lm) -> bool:
    """Whether the LM was trained for system prompts (PersonaPlex: its config says so, or its
    depformer also predicts the user's stream). Prompting another model works but is not
    what it was trained for; ``LmGen.system_prompt`` warns then."""
    from .lm import LmConfig

    validate.instance("lm.cfg", getattr(lm, "cfg", None), LmConfig, "an LmConfig (`lm` an Lm)")
    return lm.cfg.persona


def wrap_with_system_tags(text: str) -> str:
    """The text prompt as PersonaPlex was trained on it: ``<system> ... <system>`` around the
    stripped text, unless it already starts and ends with the tag."""
    text = text.strip()
    if text.startswith("<system>") and text.endswith("<system>"):
        return text
    return f"<system> {text} <system>"


def check_text_prompt(text: str, name: str = "text") -> str:
    """``text`` if it can be a text prompt: valid text of at most ``MAX_TEXT_CHARS``
    (``name``: the argument, or the flag's destination, that gave it)."""
    text = validate.text(name, text)
    if len(text) > MAX_TEXT_CHARS:
        raise MoshiError(
            f"the text prompt has {len(text)} characters; a role needs a paragraph, at most "
            f"{MAX_TEXT_CHARS} characters ({MAX_TEXT_TOKENS} tokens)"
        )
    return text


def text_prompt_tokens(tokenizer, text: str) -> list[int]:
    """Token ids of a text prompt (``tokenizer``: the model's SentencePiece processor); at
    most ``MAX_TEXT_TOKENS``, ``MAX_TEXT_CHARS`` checked before tokenizing."""
    if not callable(getattr(tokenizer, "encode", None)):
        raise MoshiError(f"`tokenizer` must be a SentencePiece processor, got {tokenizer!r}")
    tokens = list(tokenizer.encode(wrap_with_system_tags(check_text_prompt(text))))
    if len(tokens) > MAX_TEXT_TOKENS:
        raise MoshiError(
            f"the text prompt is {len(tokens)} tokens; at most {MAX_TEXT_TOKENS} fit (one frame "
            "each, 40 s of the model's context): shorten it"
        )
    return tokens


def check_voice_length(seconds: float, name: str | Path = "the voice recording") -> None:
    """Refuse a voice recording longer than ``MAX_VOICE_S`` (call it from the file's header,
    before reading it)."""
    if seconds > MAX_VOICE_S:
        raise MoshiError(
            f"{name} holds {seconds:.1f} s of audio; a voice prompt takes at most "
            f"{MAX_VOICE_S:g} s of the voice: cut it (e.g. ffmpeg -i IN -t 10 OUT.wav)"
        )


def voice_prompt_from_pcm(mimi, pcm: np.ndarray, sample_rate: int) -> mx.array:
    """Mimi codes ``[1, 8, F]`` of a recording of the voice, prepared as NVIDIA does.

    ``pcm``: mono float samples ``[T]`` at Mimi's rate (24 kHz; resample first). The audio is
    normalised to -24 LUFS, cut into 1920-sample frames (the last one zero-padded, as NVIDIA
    pads it, so ``F = ceil(T / 1920)``) and encoded frame by frame with ``encode_step`` from a
    fresh stream. Mimi is reset before and after: the conversation's stream starts fresh.
    """
    import mlx.core as mx

    from .loudness import normalize_loudness
    from .mimi import Mimi

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
    check_voice_length(pcm.size / sample_rate)
    pcm = normalize_loudness(pcm, sample_rate, VOICE_PROMPT_LUFS)
    frame = mimi.frame_size
    pcm = np.pad(pcm, (0, -pcm.size % frame))
    mimi.reset()
    codes = []
    try:
        for i in range(0, pcm.size, frame):  # evaluated frame by frame: no graph piles up
            step = mimi.encode_step(mx.array(pcm[i : i + frame])[None, None])
            codes.append(step[:, :VOICE_PROMPT_CODEBOOKS])
            mx.eval(codes[-1])
    finally:
        mimi.reset()
    return mx.concatenate(codes, axis=2)


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
    import mlx.core as mx

    from .mimi import Mimi

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


def voice_file_kind(path: str | Path) -> str | None:
    """What a voice file is, from its first bytes: ``"wav"`` (RIFF/WAVE), ``"safetensors"`` (a
    little-endian header length, then a JSON object), ``"torch"`` (a pickle, or the zip of
    ``torch.save``), or None. ``path`` must be a regular file (``outputs.check_input``)."""
    with open(path, "rb") as f:
        head = f.read(16)
    if head[:4] == b"RIFF" and head[8:12] == b"WAVE":
        return "wav"
    if len(head) >= 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") > 1:
        return "safetensors"
    if head[:1] == b"\x80" or head[:4] == b"PK\x03\x04":
        return "torch"
    return None


TORCH_REFUSED = (
    "NVIDIA's .pt voice prompts are torch pickles, which we never load; make a voice prompt "
    "from a WAV of the voice instead (persona.voice_prompt_from_pcm, then "
    "persona.save_voice_prompt)"
)


def load_voice_prompt(path: str | Path, mimi) -> mx.array:
    """Voice-prompt codes ``[1, 8, F]`` saved by ``save_voice_prompt``; refuses files made for
    another codec than ``mimi``, files of another kind (told by their bytes, not their name),
    NVIDIA's ``.pt`` voice files, and prompts longer than ``MAX_VOICE_FRAMES`` (from the
    header, before reading the codes)."""
    import mlx.core as mx

    from .mimi import Mimi
    from .outputs import check_input
    from .weights import CheckpointError, check_safetensors

    path = validate.path("path", path)
    validate.instance("mimi", mimi, Mimi, "a Mimi")
    if not path.exists() and not path.is_symlink():
        raise MoshiError(f"voice prompt not found: {path}")
    check_input(path, "the voice prompt")
    kind = voice_file_kind(path)
    if kind == "torch":
        raise MoshiError(f"{path}: {TORCH_REFUSED}")
    if kind != "safetensors":
        raise MoshiError(f"{path} is not a safetensors file (not a voice prompt)")
    try:
        check_safetensors(path)
    except CheckpointError:
        raise MoshiError(f"{path} is not a safetensors file (not a voice prompt)") from None
    with open(path, "rb") as f:
        header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
    metadata = header.get("__metadata__") or {}
    if metadata.get("format") != VOICE_PROMPT_FORMAT or set(header) - {"__metadata__"} != {"codes"}:
        raise MoshiError(f"{path} is not a voice prompt made by save_voice_prompt")
    wanted = _codec(mimi)
    differ = [f"{k} {metadata.get(k)} (this Mimi: {v})" for k, v in wanted.items()
              if metadata.get(k) != v]  # fmt: skip
    if differ:
        raise MoshiError(f"{path} was made for another codec: {', '.join(differ)}")
    shape = header["codes"]["shape"]
    if len(shape) != 3 or shape[:2] != [1, VOICE_PROMPT_CODEBOOKS]:
        raise MoshiError(f"{path}: codes have shape {list(shape)}, not [1, 8, frames]")
    if shape[2] > MAX_VOICE_FRAMES:
        raise MoshiError(
            f"{path} holds {shape[2]} frames of voice ({shape[2] * 0.08:.1f} s); a voice prompt "
            f"takes at most {MAX_VOICE_FRAMES} ({MAX_VOICE_S:g} s)"
        )
    return mx.load(str(path), format="safetensors")["codes"]
