"""Measurements behind the README's conversion figures (not used by the converter itself).

``python scripts/measure.py quality``: what 8-bit and 4-bit quantization do to
teacher-forced logits of the fixture LMs (needs ``tests/fixtures``).
``python scripts/measure.py memory --size medium``: writes a random checkpoint in
Kyutai's PyTorch layout to a temporary folder and converts it in a fresh process, reporting
time, peak MLX memory and max RSS.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

from moshi_mlx.convert.streaming import write_safetensors
from moshi_mlx.lm import Lm, LmConfig
from moshi_mlx.loading import load_lm
from moshi_mlx.quantize import Quantization, logit_error, quantize_lm

# ---- quantization quality ---------------------------------------------------------------------


def quantized_copy(weights, config, bits: int, group_size: int) -> tuple[Lm, float]:
    """The LM quantized from its stored (bf16) weights as ``convert -q`` does, computing in
    float32; also the fraction of LM weights that got quantized."""
    model = load_lm(weights, config, dtype=None)
    sizes = {k: v.size for k, v in tree_flatten(model.parameters())}
    kept = quantize_lm(model, Quantization(bits, group_size)).kept
    kept_size = sum(n for k, n in sizes.items() if any(k.startswith(s + ".") for s in kept))
    model.set_dtype(mx.float32)  # scales and norms upcast exactly: only quantization differs
    return model, 1 - kept_size / sum(sizes.values())


def random_codes(cfg: LmConfig, steps: int, seed: int) -> mx.array:
    rng = np.random.default_rng(seed)
    text = rng.integers(0, cfg.text_card, (1, 1, steps))
    audio = rng.integers(0, cfg.card, (1, cfg.n_q, steps))
    return mx.array(np.concatenate([text, audio], axis=1))


QUALITY_MODELS = {
    # name: (folder under tests/fixtures, teacher-forced codes)
    "fixture LM": ("lm", "tf_codes"),
    "upstream_mlx/quant LM": ("upstream_mlx/quant", None),
}


def quality(fixtures: Path) -> list[dict]:
    rows = []
    for name, (sub, codes_name) in QUALITY_MODELS.items():
        folder = fixtures / sub
        weights = folder / ("weights.safetensors" if sub == "lm" else "model.safetensors")
        config = folder / "config.json"
        reference = load_lm(weights, config)
        codes = (
            mx.load(str(folder / "io.safetensors"))[codes_name]
            if codes_name
            else random_codes(reference.cfg, 12, seed=4)
        )
        bf16 = load_lm(weights, config, dtype=mx.bfloat16)
        rows.append(
            {"model": name, "weights": "bf16 compute", **logit_error(bf16, reference, codes)}
        )
        for bits in (8, 4):
            for group_size in (32, 64):
                model, frac = quantized_copy(weights, config, bits, group_size)
                err = logit_error(model, reference, codes)
                rows.append(
                    {"model": name, "weights": f"q{bits} g{group_size}", "quantized": frac, **err}
                )
    return rows


def print_quality(rows: list[dict]) -> None:
    print(
        "| model | weights | share quantized | text max err | text mean err | text top-1 "
        "| audio max err | audio mean err | audio top-1 |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        t, a = r["text"], r["audio"]
        share = f"{r['quantized']:.1%}" if "quantized" in r else "-"
        print(
            f"| {r['model']} | {r['weights']} | {share} | {t['max']:.3f} | {t['mean']:.4f} "
            f"| {t['top1']}/{t['positions']} | {a['max']:.3f} | {a['mean']:.4f} "
            f"| {a['top1']}/{a['positions']} |"
        )
    for r in rows[:: len(rows) // len(QUALITY_MODELS)]:
        print(
            f"logit rms, {r['model']}: text {r['text']['std']:.2f}, audio {r['audio']['std']:.2f}"
        )


# ---- memory ----------------------------------------------------------------------------------

SIZES = {
    "fixture": None,  # the tests' fixture LM
    "medium": LmConfig(
        dim=1024,
        num_heads=16,
        num_layers=8,
        depformer_dim=512,
        depformer_num_heads=8,
        depformer_num_layers=2,
        depformer_dim_feedforward=2112,
        context=3000,
    ),
    "7b": LmConfig.moshi_7b(),
}


def pytorch_name(name: str) -> str:
    """Our LM parameter name -> the released PyTorch checkpoint's."""
    name = re.sub(r"\.self_attn\.in_proj\.weight$", ".self_attn.in_proj_weight", name)
    return re.sub(r"(norm\d?)\.weight$", r"\1.alpha", name)


def write_random_pytorch_lm(path: Path, cfg: LmConfig, seed: int = 0) -> int:
    """A random LM in Kyutai's released PyTorch layout (bf16), generated lazily and written
    tensor by tensor (so the generator stays small too)."""
    tensors = {}
    for i, (name, p) in enumerate(tree_flatten(Lm(cfg).parameters())):
        if re.search(r"norm\d?\.weight$", name):
            value = mx.ones((1, 1, p.shape[0]), mx.bfloat16)
        else:
            # Drawing billions of normals is slow on a CPU: tile a random block of 256 rows.
            key = mx.random.key(seed * 100_003 + i)
            block = mx.random.normal((min(256, p.shape[0]), p.shape[1]), scale=0.02, key=key)
            reps = -(-p.shape[0] // block.shape[0])
            value = mx.tile(block, (reps, 1))[: p.shape[0]].astype(mx.bfloat16)
        tensors[pytorch_name(name)] = value
    nbytes = write_safetensors(path, tensors)
    mx.clear_cache()
    return nbytes


def memory(size: str, fixtures: Path, extra: list[str], workdir: Path | None = None) -> None:
    """Convert a checkpoint of ``size`` with the CLI flags ``extra`` in a fresh process. With
    ``workdir`` the random checkpoint is kept there and reused by later runs."""
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        work = workdir or tmp
        work.mkdir(parents=True, exist_ok=True)
        if SIZES[size] is None:
            lm, lm_config = fixtures / "lm/weights.safetensors", fixtures / "lm/config.json"
        else:
            lm, lm_config = work / f"{size}.safetensors", work / f"{size}.json"
            lm_config.write_text(json.dumps(SIZES[size].to_dict()))
        if not lm.exists():
            # In a child: Linux carries a parent's peak RSS over into the children it starts.
            t = time.perf_counter()
            subprocess.run([sys.executable, __file__, "random-lm",
                            "--size", size, "--out", str(lm)], check=True)  # fmt: skip
            gb = lm.stat().st_size / 1e9
            print(f"random {size} LM: {gb:.2f} GB bf16 in {time.perf_counter() - t:.0f} s")
        cmd = [str(Path(sys.executable).with_name("moshi-mlx")), "convert",
               "--moshi-weights", str(lm),
               "--lm-config", str(lm_config), "--mimi-weights",
               str(fixtures / "mimi/weights.safetensors"), "--mimi-config",
               str(fixtures / "mimi/config.json"), "--tokenizer", str(_tokenizer(tmp)),
               "--mlx-path", str(tmp / "out"), *extra]  # fmt: skip
        baseline = subprocess.run(
            [sys.executable, "-c", "import moshi_mlx.convert.convert, resource; "
             "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)"],
            capture_output=True, text=True, check=True,
        ).stdout.strip()  # fmt: skip
        scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, else KiB
        print(f"max RSS of the imports alone: {int(baseline) * scale / 1e6:.0f} MB")
        print(" ".join(extra) or "no flags", "->", subprocess.run(
            cmd, capture_output=True, text=True, check=True).stdout.strip())  # fmt: skip


def _tokenizer(folder: Path) -> Path:
    import sentencepiece as spm

    corpus = folder / "corpus.txt"
    corpus.write_text("moshi listens and speaks at the same time\n" * 50)
    spm.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(folder / "spm"), vocab_size=32,
        pad_id=3, unk_id=0, bos_id=1, eos_id=2, minloglevel=2, hard_vocab_limit=False,
    )  # fmt: skip
    return folder / "spm.model"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=["quality", "memory", "random-lm"])
    parser.add_argument("--out", type=Path, help="random-lm: where to write it")
    parser.add_argument("--workdir", type=Path, help="memory: keep the random checkpoint here")
    parser.add_argument("--fixtures", type=Path, default=Path("tests/fixtures"))
    parser.add_argument("--size", choices=list(SIZES), default="medium")
    args, extra = parser.parse_known_args(argv)
    if args.what == "quality":
        print_quality(quality(args.fixtures))
    elif args.what == "random-lm":
        write_random_pytorch_lm(args.out, SIZES[args.size])
    else:
        memory(args.size, args.fixtures, extra, args.workdir)


if __name__ == "__main__":
    main()
