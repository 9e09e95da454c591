"""``moshi-mlx bench``: output format, reference-compatible records and error messages.

Tiny random models only; nothing here asserts speed."""

from __future__ import annotations

import argparse
import json
import re
import shutil
from pathlib import Path

import mlx.core as mx
import pytest
from conftest import MIMI_DIR, UPSTREAM_MLX_DIR, run_python

from moshi_mlx import Sampling
from moshi_mlx.app import bench
from moshi_mlx.app.cli import main

TINY_LM = {
    "dim": 64, "text_card": 64, "n_q": 16, "dep_q": 8, "card": 2048, "num_heads": 2,
    "num_layers": 1, "context": 32, "depformer_dim": 32, "depformer_dim_feedforward": 132,
    "depformer_num_heads": 2, "depformer_num_layers": 1,
    "delays": [0, 0, 1, 1, 1, 1, 1, 1, 1, 0, 1, 1, 1, 1, 1, 1, 1],
}  # fmt: skip
TINY_MIMI = str(MIMI_DIR / "config.json")  # 24 kHz, 1920-sample frames, a few thousand weights
REQUIRED_JSON_KEYS = {
    "frame_ms_p50", "frame_ms_p95", "lm_step_ms_p50", "mimi_ms_p50", "rtf", "peak_memory_gb",
    "frame_interval_ms_p50", "frame_interval_ms_p95", "frame_latency_ms_p50",
    "frame_latency_ms_p95", "peak_memory_full_context_gb",
}  # fmt: skip
KEY_VALUE = re.compile(r"^[a-z0-9_.]+=\S.*$")


@pytest.fixture(scope="module")
def tiny_config(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("bench") / "tiny_lm.json"
    path.write_text(json.dumps(TINY_LM))
    return str(path)


def run_bench(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(["bench", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def tiny_args(config: str, *extra: str) -> list[str]:
    return ["--random-weights", "--config", config, "--mimi-config", TINY_MIMI,
            "--steps", "3", "--warmup", "2", *extra]  # fmt: skip


def test_key_value_lines_cover_every_stage(capsys, tiny_config):
    code, out, _ = run_bench(capsys, *tiny_args(tiny_config, "--kv"))
    assert code == 0
    lines = out.strip().splitlines()
    assert all(KEY_VALUE.match(line) for line in lines), [
        line for line in lines if not KEY_VALUE.match(line)
    ]
    values = dict(line.split("=", 1) for line in lines)
    stages = ("frame", "lm_step", "mimi", "encode", "temporal", "depth", "decode",
              "frame_interval", "frame_latency")  # fmt: skip
    for stage in stages:
        for q in ("p50", "p95"):
            assert float(values[f"{stage}_ms_{q}"]) > 0, stage
        assert float(values[f"{stage}_ms_p95"]) >= float(values[f"{stage}_ms_p50"])
    for key in ("rtf", "rtf_ref", "fps", "peak_memory_gb", "mlx_version", "device"):
        assert values[key]
    assert values["frame_timing"].startswith("pipelined engine push")  # what chat runs
    assert values["engine"] == "pipelined" and values["mimi_device"] == "cpu"
    assert values["config.dim"] == "64" and values["dtype"] == "bfloat16"


def test_json_is_one_object_with_the_issue_keys(capsys, tiny_config):
    code, out, _ = run_bench(capsys, *tiny_args(tiny_config, "--json"))
    assert code == 0
    result = json.loads(out)  # the whole of stdout is one object
    assert REQUIRED_JSON_KEYS <= result.keys()
    assert result["rtf"] == pytest.approx(result["frame_interval_ms_p50"] / 80, rel=1e-3)
    assert result["rtf_ref"] == pytest.approx(80 / result["frame_interval_ms_p50"], rel=1e-3)
    assert result["peak_memory_gb"] > 0 and result["peak_memory_full_context_gb"] > 0
    assert result["quant"] is None and result["config"]["num_layers"] == 1


def test_summary_is_a_headline_and_a_few_lines_from_the_result(capsys, tiny_config):
    code, out, _ = run_bench(capsys, *tiny_args(tiny_config))
    assert code == 0
    lines = out.strip().splitlines()
    assert lines[0].startswith(f"moshi-mlx bench: random weights, config {tiny_config}")
    assert "pipelined engine" in lines[0] and "cpu (MLX " in lines[0]
    assert 5 <= len(lines) <= 10 and not any(KEY_VALUE.match(line) for line in lines)
    labels = [line.split()[0] for line in lines[1:-1]]
    assert labels == ["frame", "answers", "real", "stages", "memory"]
    # The lines are the JSON's figures, and the real-time factor one way only.
    result = json.loads(run_bench(capsys, *tiny_args(tiny_config, "--json"))[1])
    text = "\n".join(bench.summary(result))
    assert f"{result['frame_ms_p50']:.1f} ms median, {result['frame_ms_p95']:.1f} ms p95" in text
    real_time = next(line for line in text.splitlines() if line.startswith("  real time"))
    assert re.findall(r"\d+\.\d+", real_time) == [f"{result['rtf']:.2f}"]  # not its inverse
    assert f"peak {result['peak_memory_gb']:.2f} GB" in text


def test_json_and_kv_are_one_or_the_other(capsys, tiny_config):
    code, out, err = run_bench(capsys, *tiny_args(tiny_config, "--json", "--kv"))
    assert code == 1 and out == "" and "give --json or --kv, not both" in err


def test_sizes_scale_every_part(capsys):
    from moshi_mlx.random_weights import sized_config

    for size in ("tiny", "medium"):
        assert bench.lm_config_from_args(scale_args(config=size)) == sized_config(size)[0]
    argv = ["--random-weights", "--config", "tiny", "--steps", "1", "--warmup", "0",
            "--no-stages", "--json"]  # fmt: skip
    code, out, err = run_bench(capsys, *argv)
    assert code == 0 and "warning" not in err
    result = json.loads(out)
    assert result["config"]["dim"] == result["config"]["depformer_dim"] == 256
    assert result["mimi"] == "random weights, config tiny"  # a tiny Mimi, not the released one
    assert result["mimi_params_gb"] < 0.01
    assert result["kept_full_size"] == ["text vocabulary (32000)", "context (3000 steps)"]


def test_a_scaled_config_says_which_parts_it_keeps(capsys, tiny_config):
    args = scale_args(config="moshi-2b", dim=256, no_mimi=False, mimi_weights=None)
    kept = bench.kept_parts(args, LmConfig_moshi_2b(256), None)
    assert kept == ["depth transformer (1024 wide, 6 layers, 16 steps)",
                    "text vocabulary (48000)", "context (3000 steps)",
                    "Mimi (the released codec)"]  # fmt: skip
    code, out, err = run_bench(capsys, *tiny_args(tiny_config, "--dim", "128", "--no-mimi"))
    assert code == 0
    warning = "the scaled " + tiny_config + " keeps at full size: depth transformer (32 wide"
    assert warning in err and len(err.strip().splitlines()) == 1
    assert "kept         at full size: depth transformer (32 wide, 1 layers, 8 steps)" in out
    assert "scaled (dim 128)" in out.splitlines()[0]


def LmConfig_moshi_2b(dim: int):
    from moshi_mlx import LmConfig
    from moshi_mlx.random_weights import scale_lm_config

    return scale_lm_config(LmConfig.moshi_2b(), dim=dim)


def test_serial_engine_answers_from_its_own_frame(capsys, tiny_config):
    code, out, _ = run_bench(capsys, *tiny_args(tiny_config, "--engine", "serial", "--json"))
    assert code == 0
    result = json.loads(out)
    assert result["engine"] == "serial" and result["frame_timing"].startswith("serial")
    assert result["rtf"] == pytest.approx(result["frame_ms_p50"] / 80, rel=1e-3)
    # Serial: a frame's answer comes back from its own push, so latency is the push's time.
    assert result["frame_latency_ms_p50"] == pytest.approx(result["frame_ms_p50"], rel=0.05)


def test_pipelined_latency_spans_the_next_push(capsys, tiny_config):
    code, out, _ = run_bench(capsys, *tiny_args(tiny_config, "--steps", "6", "--json"))
    assert code == 0
    result = json.loads(out)
    # The answer to a frame comes from the next push: its latency covers two pushes' worth.
    assert result["frame_latency_ms_p50"] > result["frame_interval_ms_p50"]


def test_full_context_peak_holds_the_whole_kv_window(capsys, tmp_path):
    from moshi_mlx import LmConfig
    from moshi_mlx.memory import kv_cache_bytes

    path = tmp_path / "long.json"  # a long window in a wide model: 12.6 MB of KV cache
    path.write_text(json.dumps({**TINY_LM, "dim": 256, "num_layers": 2, "context": 3072}))
    argv = tiny_args(str(path), "--no-mimi", "--no-stages", "--json")
    code, out, _ = run_bench(capsys, *argv)
    assert code == 0
    result = json.loads(out)
    kv = kv_cache_bytes(LmConfig.from_dict(json.loads(path.read_text()))) / 1e9
    assert result["peak_memory_full_context_gb"] >= result["lm_params_gb"] + kv
    assert result["peak_memory_full_context_gb"] - result["peak_memory_gb"] > 0.9 * kv


def test_a_model_too_big_for_the_device_is_refused_before_it_is_built(capsys, monkeypatch):
    monkeypatch.setenv("MOSHI_MLX_MEMORY_LIMIT_GB", "12")
    code, out, err = run_bench(capsys, "--random-weights", "--steps", "1")  # 7B in bf16
    assert code == 1 and out == ""
    assert len(err.strip().splitlines()) == 1
    assert "Moshi needs 18.2 GB" in err and "MOSHI_MLX_MEMORY_LIMIT_GB allows 12.0 GB" in err
    assert "use --quantize 8 (10.6 GB)" in err


def test_quantized_run_reports_bits_and_default_group_size(capsys, tmp_path):
    path = tmp_path / "q.json"  # FFN widths 11/4 x 128 = 352: a multiple of 32
    path.write_text(json.dumps({**TINY_LM, "dim": 128, "depformer_dim": 128,
                                "depformer_dim_feedforward": 528}))  # fmt: skip
    argv = tiny_args(str(path), "--no-mimi", "--no-stages", "-q", "4", "--json")
    code, out, _ = run_bench(capsys, *argv)
    assert code == 0
    result = json.loads(out)
    assert result["quant"] == {"bits": 4, "group_size": 32}
    assert result["mimi_ms_p50"] is None and result["lm_step_ms_p50"] > 0
    assert result["frame_ms_p50"] == result["lm_step_ms_p50"]  # no Mimi: the frame is the LM
    assert "temporal_ms_p50" not in result  # --no-stages: no pass synced per stage


def test_mimi_only_times_encode_and_decode(capsys):
    argv = ["--no-lm", "--random-weights", "--mimi-config", TINY_MIMI, "--steps", "2", "--json"]
    code, out, _ = run_bench(capsys, *argv)
    assert code == 0
    result = json.loads(out)
    assert result["lm_step_ms_p50"] is None
    assert result["frame_ms_p50"] == result["mimi_ms_p50"] > 0
    assert result["encode_ms_p50"] > 0 and result["decode_ms_p50"] > 0


def test_json_out_appends_the_result_with_its_samples(capsys, tiny_config, tmp_path):
    path = tmp_path / "ours.jsonl"
    for _ in range(2):
        code, out, _ = run_bench(capsys, *tiny_args(tiny_config, "--json-out", str(path)))
        assert code == 0
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(records) == 2 and REQUIRED_JSON_KEYS <= records[0].keys()
    samples = records[0]["samples_ms"]
    assert len(samples["lm"]) == len(samples["frame"]) == len(samples["stages.depth"]) == 3
    assert records[0]["lm_step_ms_p50"] == pytest.approx(sorted(samples["lm"])[1], abs=1e-3)
    assert out.startswith("moshi-mlx bench: ")  # the summary still goes to stdout


def test_default_sampling_is_what_chat_runs(capsys, tiny_config):
    code, out, _ = run_bench(capsys, *tiny_args(tiny_config, "--no-mimi", "--json"))
    result = json.loads(out)
    assert code == 0 and result["sampler"] == "top-k"
    assert result["sampling"] == Sampling(seed=bench.DEFAULT_SEED).as_dict()
    argv = tiny_args(
        tiny_config, "--no-mimi", "--json", "--sampler", "top-p", "--top-p-text", "0.5"
    )
    code, out, _ = run_bench(capsys, *argv)
    sampling = json.loads(out)["sampling"]
    assert sampling["top_p"] == 0.95 and sampling["top_p_text"] == 0.5 and sampling["top_k"] == 0


def test_converted_model_from_a_folder(capsys, pytorch_repo):
    argv = ["--hf-path", str(pytorch_repo), "--steps", "2", "--warmup", "1", "--json"]
    code, out, _ = run_bench(capsys, *argv)
    assert code == 0
    result = json.loads(out)
    assert result["model"] == str(pytorch_repo) and result["quant"] is None
    assert result["config"]["dim"] == 64  # the fixture LM, not a preset
    assert result["frame_ms_p50"] > 0 and result["mimi_ms_p50"] > 0


def one_lm_file(tmp_path: Path, name: str) -> Path:
    # Kyutai's MLX layout (random LM of the fixtures), one weight file, no Mimi, no tokenizer.
    folder = tmp_path / name
    folder.mkdir()
    for f in ("config.json", name):
        shutil.copy(UPSTREAM_MLX_DIR / "quant" / f, folder / f)
    return folder


def test_converted_lm_alone_needs_no_mimi_or_tokenizer(capsys, tmp_path):
    folder = one_lm_file(tmp_path, "model.q4.safetensors")
    argv = ["--hf-path", str(folder), "--no-mimi", "--steps", "2", "--warmup", "1", "--json"]
    code, out, _ = run_bench(capsys, *argv)
    assert code == 0
    result = json.loads(out)
    assert result["quant"] == {"bits": 4, "group_size": 32}  # read from the file
    assert result["mimi"] is None and result["lm_step_ms_p50"] > 0


def test_quantizing_a_quantized_model_is_refused(capsys, tmp_path):
    folder = one_lm_file(tmp_path, "model.q8.safetensors")
    code, _, err = run_bench(capsys, "--hf-path", str(folder), "--no-mimi", "-q", "4")
    assert code == 1 and "already quantized" in err and len(err.strip().splitlines()) == 1


def scale_args(**kw) -> argparse.Namespace:
    base = dict(config=None, dim=None, heads=None, layers=None, dep_dim=None, dep_heads=None,
                dep_layers=None, context=None, text_card=None)  # fmt: skip
    return argparse.Namespace(**{**base, **kw})


# The rows of ../shared/peer_bench/RESULTS.md: scale-down flags -> the structure the reference
# harness builds (heads dim/128 and dep_dim/64, gated FFN hidden 11/4 of the width).
REF_ROWS = {
    "tiny": (dict(dim=256, layers=2, dep_dim=256, dep_layers=2), (256, 2, 2, 704, 256, 4, 2, 704)),
    "medium": (dict(dim=1024, layers=8, dep_dim=512, dep_layers=2),
               (1024, 8, 8, 2816, 512, 8, 2, 1408)),
    "7b": (dict(), (4096, 32, 32, 11264, 1024, 16, 6, 2816)),
}  # fmt: skip


@pytest.mark.parametrize("row", REF_ROWS)
def test_scaled_configs_match_the_reference_structure(row):
    flags, expected = REF_ROWS[row]
    c = bench.lm_config_from_args(scale_args(**flags))
    structure = (c.dim, c.num_heads, c.num_layers, c.hidden_dim, c.depformer_dim,
                 c.depformer_num_heads, c.depformer_num_layers, c.depformer_hidden_dim)  # fmt: skip
    assert structure == expected
    assert (c.context, c.text_card, c.card, c.dep_q) == (3000, 32000, 2048, 8)


def test_config_presets_and_json(tiny_config):
    assert bench.lm_config_from_args(scale_args(config="moshi-2b")).dim == 2560
    assert bench.lm_config_from_args(scale_args(config=tiny_config)).num_layers == 1


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--random-weights", "--config", "moshiko-3b"], "unknown config 'moshiko-3b'"),
        (["--random-weights", "--config", "/nonexistent/lm.json"], "not found"),
        (["--random-weights", "-q", "3"], "takes 4 or 8 bits, got '3'"),
        (["--random-weights", "-q", "--q-bits", "3"], "--q-bits must be 4 or 8, got 3"),
        (["--random-weights", "-q", "4", "--q-group-size", "48"], "must be 32, 64 or 128"),
        (["--random-weights", "--q-group-size", "64"], "need -q/--quantize"),
        (["--random-weights", "-q", "8", "--q-bits", "4"], "disagree"),
        (["--random-weights", "--temp", "nan"], "--temp must be a finite number"),
        (["--random-weights", "--seed", "-1"], "--seed must be an integer >= 0"),
        ([], "no model"),
        (["--no-lm", "--mimi-weights", "/nonexistent/mimi.safetensors"], "file not found"),
        (["--random-weights", "--no-lm", "--no-mimi"], "nothing to time"),
        (["--random-weights", "--steps", "0"], "--steps must be at least 1"),
        (["--hf-path", "/nonexistent/model"], "no such folder"),
        (["--hf-path", "some/repo", "--dim", "256"], "--dim scales a --random-weights config"),
        (["--random-weights", "--engine", "parallel"], "invalid choice: 'parallel'"),
    ],
)
def test_errors_are_one_line(capsys, argv, message):
    code, out, err = run_bench(capsys, *argv)
    assert code == 1 and out == ""
    assert len(err.strip().splitlines()) == 1 and message in err, err


@pytest.mark.skipif(mx.metal.is_available() or mx.cuda.is_available(), reason="has a GPU")
def test_mimi_on_a_gpu_that_is_not_there_is_refused(capsys):
    code, _, err = run_bench(capsys, "--random-weights", "--mimi-device", "gpu")
    assert code == 1 and len(err.strip().splitlines()) == 1
    assert "--mimi-device gpu: MLX has no GPU on this machine; use cpu" in err


def test_group_size_that_divides_no_width_is_refused(capsys, tmp_path):
    path = tmp_path / "odd.json"
    path.write_text(json.dumps({**TINY_LM, "dim": 96}))  # widths 96, 264, 32, 88: none of 64
    code, _, err = run_bench(
        capsys, "--random-weights", "--config", str(path), "--no-mimi", "-q", "8"
    )
    assert code == 1
    assert len(err.strip().splitlines()) == 1
    assert "--q-group-size 64 divides the input width of none of the" in err


def test_bench_does_not_import_audio_devices():
    # The GPU machine has no PortAudio; the bench must not need sounddevice.
    code = "import sys, moshi_mlx.app.bench; sys.exit('sounddevice' in sys.modules)"
    assert run_python(code).returncode == 0
