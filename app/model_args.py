"""Model and sampling flags shared by the subcommands that run Moshi (``chat``, ``run``, ...).

``add_model_arguments(parser)`` and ``add_sampling_arguments(parser)`` add the flags;
``load_model(args)`` and ``sampling_from_args(args)`` turn the parsed values into the
``(lm, mimi, tokenizer)`` triple and a ``Sampling``.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from dataclasses import dataclass

from moshi_mlx.weights import DEFAULT_GROUP_SIZE

DEFAULT_MODEL = "kyutai/moshiko-mlx-q4"
QUANTIZED_REPOS = {4: "kyutai/moshiko-mlx-q4", 8: "kyutai/moshiko-mlx-q8"}
DTYPE_CHOICES = ("bfloat16", "float16", "float32")


@dataclass
class Sampling:
    """How Moshi's tokens are drawn; temperature 0 is greedy (argmax)."""

    temp: float = 0.8
    temp_text: float = 0.7
    top_k: int = 250
    top_k_text: int = 25
    seed: int | None = None

    def gen_kwargs(self) -> dict:
        """Keyword arguments for ``moshi_mlx.LmGen``."""
        return dict(
            temp=self.temp,
            temp_text=self.temp_text,
            top_k=self.top_k,
            top_k_text=self.top_k_text,
            seed=self.seed,
        )


def add_model_arguments(parser: argparse.ArgumentParser, quantize: bool = True) -> None:
    g = parser.add_argument_group("model")
    g.add_argument(
        "--hf-path",
        default=None,
        help=f"model folder or Hugging Face repo id: written by `moshi-mlx convert`, one of "
        f"Kyutai's MLX repos or its PyTorch release (default {DEFAULT_MODEL}, downloaded and "
        f"cached on first use; HF_HUB_OFFLINE=1 uses the cache only)",
    )
    if quantize:
        g.add_argument(
            "-q",
            "--quantize",
            action="store_true",
            help="quantize an unquantized model (a bf16 folder, the PyTorch release) when loading; "
            "without --hf-path it picks Kyutai's repo of --q-bits instead",
        )
        g.add_argument("--q-bits", type=int, choices=(4, 8), default=4, help="bits for -q")
        g.add_argument(
            "--q-group-size",
            type=int,
            default=None,
            help="group size for -q (4 bit: 32, 8 bit: 64)",
        )
    g.add_argument(
        "--dtype",
        choices=DTYPE_CHOICES,
        default=None,
        help="cast unquantized LM weights to this dtype (default: as stored)",
    )


def add_sampling_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("sampling (temperature 0 = greedy)")
    d = Sampling()
    g.add_argument("--temp", type=float, default=d.temp, help=f"audio temperature ({d.temp})")
    g.add_argument(
        "--temp-text", type=float, default=d.temp_text, help=f"text temperature ({d.temp_text})"
    )
    g.add_argument("--top-k", type=int, default=d.top_k, help=f"audio top-k ({d.top_k})")
    g.add_argument(
        "--top-k-text", type=int, default=d.top_k_text, help=f"text top-k ({d.top_k_text})"
    )
    g.add_argument("--seed", type=int, default=None, help="random seed: same input, same output")


def sampling_from_args(args: argparse.Namespace) -> Sampling:
    from .cli import UserError

    s = Sampling(args.temp, args.temp_text, args.top_k, args.top_k_text, args.seed)
    if s.temp < 0 or s.temp_text < 0:
        raise UserError("temperatures must be >= 0 (0 means greedy)")
    if s.top_k < 0 or s.top_k_text < 0:
        raise UserError("top-k must be >= 0 (0 means no top-k cut)")
    return s


def model_name(args: argparse.Namespace) -> str:
    """What ``--hf-path`` / ``-q`` ask for: a folder or repo id."""
    if args.hf_path:
        return args.hf_path
    if getattr(args, "quantize", False):
        return QUANTIZED_REPOS[args.q_bits]
    return DEFAULT_MODEL


def load_model(args: argparse.Namespace, report: Callable[[str], None] = print):
    """``(lm, mimi, tokenizer)`` for the model flags; call it on the thread that will run the
    model. ``report`` receives one-line progress messages."""
    import moshi_mlx
    from moshi_mlx import hub

    from .cli import UserError

    name = model_name(args)
    start = time.perf_counter()
    if hub.local_folder(name) is None:
        report(f"fetching {name} from the Hugging Face Hub (cached after the first run)")
    try:
        lm, mimi, tokenizer = moshi_mlx.load(name, dtype=args.dtype)
    except (ValueError, OSError) as e:
        raise UserError(" ".join(str(e).split())) from None
    if getattr(args, "quantize", False) and args.hf_path:
        _quantize(lm, args, report)
    report(f"model ready in {time.perf_counter() - start:.1f} s")
    return lm, mimi, tokenizer


def _quantize(lm, args: argparse.Namespace, report: Callable[[str], None]) -> None:
    import mlx.core as mx

    from moshi_mlx.weights import quantization_of, quantize_lm

    from .cli import UserError

    if quantization_of(lm) is not None:
        report("the model is already quantized; -q has nothing to do")
        return
    group_size = args.q_group_size or DEFAULT_GROUP_SIZE[args.q_bits]
    try:
        skipped = quantize_lm(lm, args.q_bits, group_size, skip_indivisible=True)
    except ValueError as e:
        raise UserError(str(e)) from None
    mx.eval(lm.parameters())
    kept = (
        f"; {len(skipped)} layer(s) the group size does not divide stay in float" if skipped else ""
    )
    report(f"quantized the LM to {args.q_bits} bits, group size {group_size}{kept}")
