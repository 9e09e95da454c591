"""Mimi: Kyutai's streaming neural audio codec (24 kHz mono <-> 12.5 Hz frames of RVQ codes)."""

from __future__ import annotations

from dataclasses import dataclass, field, fields

import mlx.core as mx
import mlx.nn as nn

from .conv import Conv1d, ConvTranspose1d, place
from .errors import MoshiError
from .quantizer import SplitResidualVectorQuantizer
from .seanet import SeanetConfig, SeanetDecoder, SeanetEncoder
from .transformer import MimiTransformer, TransformerConfig
from .validate import MAX_COUNT, MAX_SIZE, choice, integer, integers, kind, number

# Upstream options this implementation has one value of: any other is refused, never ignored.
_UNSUPPORTED_UNLESS = {
    "seanet": {"activation": ("ELU",), "activation_params": ({"alpha": 1.0},),
               "norm": ("none",), "pad_mode": ("constant",), "causal": (True,),
               "true_skip": (True,), "n_residual_layers": (1,), "lstm": (0,)},
    "transformer": {"causal": (True,), "gating": ("none",), "norm": ("layer_norm",),
                    "positional_embedding": ("rope",), "conv_layout": (True,),
                    "bias_ff": (False,), "bias_attn": (False,), "cross_attention": (False,)},
    "quantizer": {},
}  # fmt: skip


def _pick(cls, d: dict) -> dict:
    names = {f.name for f in fields(cls)}
    return {k: v for k, v in d.items() if k in names}


@dataclass
class MimiConfig:
    """Hyper-parameters of Mimi; defaults are the released codec (``tokenizer-e351c8d8``)."""

    sample_rate: int = 24000
    frame_rate: float = 12.5
    seanet: SeanetConfig = field(default_factory=SeanetConfig)
    transformer: TransformerConfig = field(default_factory=TransformerConfig)
    n_q: int = 32
    bins: int = 2048
    codebook_dim: int = 256

    @classmethod
    def from_dict(cls, d: dict) -> MimiConfig:
        """Read the upstream nested format (``seanet`` / ``transformer`` / ``quantizer``);
        unknown keys are ignored, options we do not implement refused."""
        if not isinstance(d, dict):
            raise MoshiError(f"Mimi config must be an object, got {type(d).__name__}")
        choice("Mimi config", "channels", d.get("channels", 1), (1,))  # mono only
        parts = {name: d.get(name, {}) for name in ("seanet", "transformer", "quantizer")}
        for name, sub in parts.items():
            if not isinstance(sub, dict):
                raise MoshiError(f"Mimi config: {name} must be an object")
            for key, supported in _UNSUPPORTED_UNLESS[name].items():
                if key in sub:
                    choice("Mimi config", f"{name}.{key}", sub[key], supported)
        seanet, tr, quant = parts.values()
        cfg = cls(
            sample_rate=d.get("sample_rate", 24000),
            frame_rate=d.get("frame_rate", 12.5),
            seanet=SeanetConfig(**_pick(SeanetConfig, seanet)),
            transformer=TransformerConfig(**_pick(TransformerConfig, tr)),
            n_q=quant.get("n_q", 32),
            bins=quant.get("bins", 2048),
            codebook_dim=quant.get("dimension", 256),
        )
        cfg.validate()
        dim = cfg.seanet.dimension
        widths = {"transformer.d_model": tr.get("d_model", dim),
                  "transformer.input_dimension": tr.get("input_dimension", dim),
                  "quantizer.input_dimension": quant.get("input_dimension", dim),
                  "quantizer.output_dimension": quant.get("output_dimension", dim)}  # fmt: skip
        for key, value in widths.items():
            if value != dim:
                raise MoshiError(f"Mimi config: {key} must equal seanet.dimension ({dim})")
        if tr.get("output_dimensions", [dim]) != [dim]:
            raise MoshiError(f"Mimi config: transformer.output_dimensions must be [{dim}]")
        return cfg

    def validate(self) -> None:
        """Every size of the right type and range, and frames that the convolutions tile."""
        what = "Mimi config"
        s, t = self.seanet, self.transformer
        integer(what, "sample_rate", self.sample_rate, 1000, 768_000)
        number(what, "frame_rate", self.frame_rate)
        integer(what, "seanet.channels", s.channels, 1, 1)
        for name in ("dimension", "n_filters", "kernel_size", "residual_kernel_size",
                     "last_kernel_size", "dilation_base", "compress"):  # fmt: skip
            integer(what, f"seanet.{name}", getattr(s, name))
        integer(what, "seanet.n_residual_layers", s.n_residual_layers, 1, MAX_COUNT)
        integers(what, "seanet.ratios", s.ratios, 1, MAX_SIZE)
        integer(what, "the length of seanet.ratios", len(s.ratios), 1, 16)  # channels double
        for name in ("dim_feedforward", "context"):
            integer(what, f"transformer.{name}", getattr(t, name))
        for name in ("num_heads", "num_layers"):
            integer(what, f"transformer.{name}", getattr(t, name), 1, MAX_COUNT)
        number(what, "transformer.max_period", t.max_period)
        number(what, "transformer.layer_scale", t.layer_scale)
        integer(what, "quantizer.n_q", self.n_q, 1, MAX_COUNT)
        integer(what, "quantizer.bins", self.bins)
        integer(what, "quantizer.dimension", self.codebook_dim)
        if s.dimension % t.num_heads:
            raise MoshiError(f"{what}: seanet.dimension must be a multiple of num_heads")
        frame = self.sample_rate / self.frame_rate
        if frame != round(frame) or round(frame) % s.hop_length or frame < s.hop_length:
            raise MoshiError(
                f"{what}: a frame of sample_rate / frame_rate = {frame:g} samples must be a "
                f"multiple of the product of seanet.ratios ({s.hop_length})"
            )

    def to_dict(self) -> dict:
        s, t = self.seanet, self.transformer
        return {
            "sample_rate": self.sample_rate,
            "channels": s.channels,
            "frame_rate": self.frame_rate,
            "seanet": {**s.__dict__, "causal": True, "true_skip": True},
            "transformer": {**t.__dict__, "causal": True},
            "quantizer": {
                "dimension": self.codebook_dim,
                "n_q": self.n_q,
                "bins": self.bins,
                "input_dimension": s.dimension,
                "output_dimension": s.dimension,
            },
        }

    @property
    def frame_size(self) -> int:
        """Samples per code frame (1920 for the real codec)."""
        return int(round(self.sample_rate / self.frame_rate))

    @property
    def downsample_stride(self) -> int:
        return self.frame_size // self.seanet.hop_length


def reset_streaming(module: nn.Module) -> None:
    """Forget all streaming state (conv buffers, KV caches) below ``module``."""
    for _, m in module.named_modules():
        if m is not module and hasattr(m, "reset"):
            m.reset()


class Mimi(nn.Module):
    """The codec. Audio uses PyTorch's layout ``[B, 1, T]`` (float32, 24 kHz) and codes
    ``[B, K, frames]``; ``K`` is ``num_codebooks`` (8 for Moshi, at most ``n_q``)."""

    def __init__(self, cfg: MimiConfig | None = None):
        super().__init__()
        cfg = cfg or MimiConfig()
        self.cfg = cfg
        dim = cfg.seanet.dimension
        stride = cfg.downsample_stride
        self.encoder = SeanetEncoder(cfg.seanet)
        self.encoder_transformer = MimiTransformer(cfg.transformer)
        self.downsample = Conv1d(
            dim, dim, 2 * stride, stride=stride, bias=False, pad_mode="replicate"
        )
        self.quantizer = SplitResidualVectorQuantizer(dim, cfg.codebook_dim, cfg.n_q, cfg.bins)
        self.upsample = ConvTranspose1d(dim, dim, 2 * stride, stride, bias=False, groups=dim)
        self.decoder_transformer = MimiTransformer(cfg.transformer)
        self.decoder = SeanetDecoder(cfg.seanet)
        self.num_codebooks = cfg.n_q
        self._encode_batch: int | None = None  # batch sizes of the running streams
        self._decode_batch: int | None = None

    # -- configuration -------------------------------------------------------------------------

    def place(self, device: mx.Device | None = None) -> None:
        """Pick the convolution kernels for the device Mimi will run on (default: MLX's
        default device): matrix products over re-laid-out weights on the CPU, MLX's own
        convolutions on the GPU. Same results either way; ``load_mimi`` calls it."""
        self.device = device or mx.default_device()
        place(self, self.device)

    @property
    def frame_size(self) -> int:
        return self.cfg.frame_size

    @property
    def sample_rate(self) -> int:
        return self.cfg.sample_rate

    def set_num_codebooks(self, k: int) -> None:
        if type(k) is not int or not 1 <= k <= self.cfg.n_q:
            raise MoshiError(f"num_codebooks must be in [1, {self.cfg.n_q}], got {k}")
        self.num_codebooks = k

    # -- checks ------------------------------------------------------------------------------

    def _check_pcm(self, pcm: mx.array, streaming: bool) -> None:
        if not isinstance(pcm, mx.array) or not mx.issubdtype(pcm.dtype, mx.floating):
            raise MoshiError(f"`pcm` must be a float mx.array [batch, 1, samples], got {kind(pcm)}")
        if pcm.ndim != 3 or pcm.shape[1] != 1 or pcm.shape[0] < 1:
            raise MoshiError(
                f"`pcm` must be [batch, 1, samples] (mono), got shape {list(pcm.shape)}"
            )
        n = pcm.shape[2]
        if streaming and (n == 0 or n % self.frame_size):
            raise MoshiError(
                f"encode_step takes a positive multiple of {self.frame_size} samples, got {n}"
            )
        if n == 0:
            raise MoshiError("`pcm` is empty")
        # NaN or infinite samples would encode to meaningless codes (all zeros) without a word
        # (checked on the CPU stream: it never waits for the GPU's queue)
        if not mx.all(mx.isfinite(pcm), stream=mx.cpu).item():
            raise MoshiError(
                "`pcm` holds NaN or infinite samples; give finite audio (e.g. in [-1, 1])"
            )
        if streaming:
            self._encode_batch = self._same_batch("encode_step", self._encode_batch, pcm.shape[0])

    def _check_codes(self, codes: mx.array, streaming: bool, values: bool = True) -> None:
        """Type and shape (no sync), and with ``values`` the range (a host sync; unchecked
        codes are clipped into the codebooks)."""
        if not isinstance(codes, mx.array) or not mx.issubdtype(codes.dtype, mx.integer):
            raise MoshiError(
                f"`codes` must be an integer mx.array [batch, codebooks, frames], got {kind(codes)}"
            )
        if codes.ndim != 3 or codes.shape[0] < 1 or codes.shape[2] < 1:
            raise MoshiError(
                f"`codes` must be [batch, codebooks, frames] with at least one frame, got "
                f"{list(codes.shape)}"
            )
        k = codes.shape[1]
        if not 1 <= k <= self.cfg.n_q:
            raise MoshiError(f"`codes` have {k} codebooks; this Mimi decodes 1 to {self.cfg.n_q}")
        if values and (mx.min(codes).item() < 0 or mx.max(codes).item() >= self.cfg.bins):
            raise MoshiError(f"`codes` must be in [0, {self.cfg.bins}); got values outside")
        if streaming:
            self._decode_batch = self._same_batch("decode_step", self._decode_batch, codes.shape[0])

    @staticmethod
    def _same_batch(call: str, started: int | None, batch: int) -> int:
        if started is not None and batch != started:
            raise MoshiError(
                f"{call} got a batch of {batch} but this stream started with {started}; call "
                "reset() to start a new stream"
            )
        return batch

    # -- batch ---------------------------------------------------------------------------------

    def encode_to_latent(self, pcm: mx.array) -> mx.array:
        """``[B, 1, T]`` -> unquantized latent ``[B, dim, ceil(T / frame_size)]``."""
        self._check_pcm(pcm, streaming=False)
        x = pcm.astype(mx.float32).transpose(0, 2, 1)
        pad = -x.shape[1] % self.frame_size
        if pad:
            x = mx.pad(x, [(0, 0), (0, pad), (0, 0)])
        x = self.encoder_transformer(self.encoder(x))
        return self.downsample(x).transpose(0, 2, 1)

    def encode(self, pcm: mx.array) -> mx.array:
        """``[B, 1, T]`` float -> codes ``[B, num_codebooks, ceil(T / 1920)]`` (uint32)."""
        latent = self.encode_to_latent(pcm).transpose(0, 2, 1)
        return self.quantizer.encode(latent, self.num_codebooks).transpose(0, 2, 1)

    def decode_latent(self, codes: mx.array) -> mx.array:
        """Codes ``[B, K, F]`` -> quantized latent ``[B, dim, F]``."""
        self._check_codes(codes, streaming=False)
        return self.quantizer.decode(codes.transpose(0, 2, 1)).transpose(0, 2, 1)

    def decode(self, codes: mx.array) -> mx.array:
        """Codes ``[B, K, F]`` -> waveform ``[B, 1, F * 1920]``."""
        x = self.decode_latent(codes).transpose(0, 2, 1)
        x = self.decoder_transformer(self.upsample(x))
        return self.decoder(x).transpose(0, 2, 1)

    # -- streaming -----------------------------------------------------------------------------

    def encode_latent_step(self, pcm: mx.array) -> mx.array:
        """Streaming ``encode_to_latent``: ``[B, 1, n * 1920]`` -> ``[B, dim, n]``."""
        self._check_pcm(pcm, streaming=True)
        x = pcm.astype(mx.float32).transpose(0, 2, 1)
        x = self.downsample.step(self.encoder_transformer.step(self.encoder.step(x)))
        return x.transpose(0, 2, 1)

    def encode_step(self, pcm: mx.array) -> mx.array:
        """Encode the next ``n * 1920`` samples ``[B, 1, n * 1920]`` -> codes ``[B, K, n]``."""
        latent = self.encode_latent_step(pcm).transpose(0, 2, 1)
        return self.quantizer.encode(latent, self.num_codebooks).transpose(0, 2, 1)

    def decode_step(self, codes: mx.array, check: bool = True) -> mx.array:
        """Decode the next frames ``[B, K, n]`` -> waveform ``[B, 1, n * 1920]``.

        ``check=False`` skips the range check of the codes (a host sync), for codes that come
        straight from the LM; codes out of range are then clipped, never read past the
        codebooks."""
        self._check_codes(codes, streaming=True, values=check)
        x = self.quantizer.decode(codes.transpose(0, 2, 1))
        x = self.decoder_transformer.step(self.upsample.step(x))
        return self.decoder.step(x).transpose(0, 2, 1)

    def reset(self) -> None:
        """Start a new stream: clears every conv buffer and KV cache (encoder and decoder)."""
        reset_streaming(self)
        self._encode_batch = self._decode_batch = None
