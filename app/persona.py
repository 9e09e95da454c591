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


def main(args: argparse.Namespace) -> int:
    import moshi_mlx
    from moshi_mlx import persona

    from .loop import SAMPLE_RATE
    from .options import model_name
    from .wavio import check_writable, read_wav, resample, temp_beside, to_mono

    out = check_writable(args.output, args.force)
    x, rate = read_wav(args.voice)
    mimi = moshi_mlx.load(model_name(args), parts=("mimi",)).mimi
    codes = persona.voice_prompt_from_pcm(mimi, resample(to_mono(x), rate, SAMPLE_RATE),
                                          SAMPLE_RATE)  # fmt: skip
    tmp = temp_beside(out)
    try:
        persona.save_voice_prompt(tmp, codes, mimi)
        tmp.replace(out)
    finally:
        tmp.unlink(missing_ok=True)
    print(f"wrote {out}: {codes.shape[-1] * 0.08:.2f} s of voice ({codes.shape[-1]} frames)")
    return 0
