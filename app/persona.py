"""``moshi-mlx persona save VOICE.wav -o VOICE.safetensors``: a voice prompt made once, reused
by ``chat`` and ``run`` (``--voice-prompt VOICE.safetensors``) without encoding it again.

The recording is read (any WAV), resampled to 24 kHz, normalised to -24 LUFS and encoded with
the model's Mimi as PersonaPlex expects (``moshi_mlx.persona``); the file holds the Mimi codes
in safetensors with what identifies the codec, never a pickle.
"""

from __future__ import annotations

import argparse

from .options import DEFAULT_MODEL

HELP = "prepare a PersonaPlex voice prompt from a WAV recording of the voice, for reuse"


def add_arguments(p: argparse.ArgumentParser) -> None:
    actions = p.add_subparsers(dest="action", required=True)
    save = actions.add_parser("save", help="encode a voice recording into a voice-prompt file",
                              description=HELP)  # fmt: skip
    save.add_argument("voice", metavar="VOICE.wav", help="a recording of the voice (any WAV)")
    save.add_argument("-o", "--output", required=True, metavar="PATH",
                      help="the voice-prompt file to write (.safetensors)")  # fmt: skip
    save.add_argument("--force", action="store_true", help="overwrite PATH if it exists")
    save.add_argument("--hf-path", default=None,
                      help=f"the model whose codec encodes it ({DEFAULT_MODEL})")  # fmt: skip


def check_voice_file(path: str, what: str) -> str:
    """What the voice file ``path`` is (``"wav"`` or ``"safetensors"``, told by its bytes), a
    WAV's length checked from its header; one line otherwise, before any model is loaded."""
    from moshi_mlx.errors import MoshiError
    from moshi_mlx.outputs import check_input

    check_input(path, what)  # before importing the library's persona code (and MLX)
    from moshi_mlx import persona

    kind = persona.voice_file_kind(path)
    if kind == "torch":
        raise MoshiError(f"{what} {path}: {persona.TORCH_REFUSED}")
    if kind == "wav":
        from .wavio import WavReader

        with WavReader(path) as r:
            persona.check_voice_length(r.frames / r.rate, f"{what} {path}")
    elif kind != "safetensors":
        raise MoshiError(
            f"{what} {path} is neither a WAV recording of the voice nor a voice prompt saved "
            "by `moshi-mlx persona save`"
        )
    return kind


def voice_codes(path: str, mimi, what: str = "the voice", report=None):
    """Mimi codes ``[1, 8, F]`` of the voice file ``path``: a WAV (any rate and channels; read
    and resampled within ``persona.MAX_VOICE_S``, then encoded frame by frame) or a saved
    voice prompt. On the model's thread."""
    from moshi_mlx import persona

    from .loop import SAMPLE_RATE
    from .wavio import WavReader

    if check_voice_file(path, what) == "safetensors":
        return persona.load_voice_prompt(path, mimi)
    with WavReader(path) as r:
        persona.check_voice_length(r.frames / r.rate, f"{what} {path}")
        pcm = mono_24k(r)
    codes = persona.voice_prompt_from_pcm(mimi, pcm, SAMPLE_RATE)
    if report is not None:
        report(f"voice prompt: {codes.shape[-1] * 0.08:.1f} s of {path}")
    return codes


def mono_24k(reader):
    """A WAV's audio (``WavReader``) mixed to mono and resampled to 24 kHz block by block:
    only the 24 kHz mono result is held (a few MB within ``persona.MAX_VOICE_S``), whatever
    the file's rate and channel count."""
    import numpy as np

    from .loop import SAMPLE_RATE
    from .resample import StreamResampler

    resampler = StreamResampler(reader.rate, SAMPLE_RATE)
    skip = round(resampler.delay_s * SAMPLE_RATE)  # the resampler's delay, taken out
    wanted = round(reader.frames * SAMPLE_RATE / reader.rate)
    block = max(1, reader.rate // 10)
    pieces, have = [], 0
    while have < skip + wanted:
        x = reader.read(block)
        mono = x.mean(axis=1, dtype=np.float32) if len(x) else np.zeros(block, np.float32)
        pieces.append(resampler(mono))
        have += len(pieces[-1])
    return np.concatenate(pieces)[skip : skip + wanted]


def main(args: argparse.Namespace) -> int:
    import moshi_mlx
    from moshi_mlx import persona
    from moshi_mlx.errors import MoshiError
    from moshi_mlx.outputs import Output

    from .options import model_name

    model_name(args)  # flag errors before any slow work
    out = Output(args.output, force=args.force, what="--output", inputs={"VOICE": args.voice},
                 models=[args.hf_path], suffix=".safetensors",
                 kind="a voice prompt (safetensors)")  # fmt: skip
    if check_voice_file(args.voice, "VOICE") != "wav":
        raise MoshiError(f"VOICE {args.voice} is not a WAV recording of the voice")
    mimi = moshi_mlx.load(model_name(args), parts=("mimi",)).mimi
    codes = voice_codes(args.voice, mimi, "VOICE")
    with out.writing() as tmp:
        persona.save_voice_prompt(tmp, codes, mimi)
    print(f"wrote {out.path}: {codes.shape[-1] * 0.08:.2f} s of voice ({codes.shape[-1]} frames)")
    return 0
