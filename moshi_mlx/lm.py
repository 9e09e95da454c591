"""Moshi's language model: the Helium temporal transformer over 1 text + ``n_q`` audio streams,
and the depth transformer ("depformer") that generates the ``dep_q`` audio codes of a frame."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.cache import ConcatenateKVCache, RotatingKVCache

from .attention import SelfAttention, attention_mask, self_attention
from .errors import MoshiError
from .layers import MultiLinear, ZeroEmbedding
from .pieces import boundary
from .validate import MAX_COUNT, MAX_DELAY, choice, flag, integer, integers, number

MAX_STT_SECONDS = 60.0  # audio delay or silence prefix of an STT config (Kyutai's: 0.5-2.5 s)

_REQUIRED = ("dim", "num_heads", "num_layers", "text_card", "card", "n_q", "dep_q", "delays")
# Only a model with a depth transformer (dep_q > 0) needs these; upstream's ``LMModel`` derives
# ``depformer_dim_feedforward`` from the others when it is absent (or null).
_REQUIRED_WITH_DEPFORMER = ("depformer_dim", "depformer_num_heads", "depformer_num_layers")
MODEL_TYPES = ("moshi", "stt")  # upstream's ``model_type``: a dialogue model or speech-to-text
# Upstream options this implementation has one value of: any other is refused, never ignored.
_UNSUPPORTED_UNLESS = {
    "gating": ("silu",), "depformer_gating": ("silu",), "positional_embedding": ("rope",),
    "depformer_pos_emb": ("none",), "norm": ("rms_norm_f32", "real_rms_norm_f32"),
    "causal": (True,), "depformer_causal": (True,), "layer_scale": (None,),
    "depformer_layer_scale": (None,), "bias_ff": (False,), "bias_attn": (False,),
    "cross_attention": (False, None), "conditioners": ({}, None), "demux_second_stream": (False,),
}  # fmt: skip


@dataclass
class LmConfig:
    """The upstream LM config (``configs/moshi_7b_202409.json`` keys); defaults are Moshi 7B."""

    dim: int = 4096
    text_card: int = 32000
    existing_text_padding_id: int = 3
    n_q: int = 16
    dep_q: int = 8
    card: int = 2048
    num_heads: int = 32
    num_layers: int = 32
    hidden_scale: float = 4.125
    context: int = 3000
    max_period: float = 10000.0
    depformer_dim: int = 1024
    depformer_dim_feedforward: int = 4224
    depformer_num_heads: int = 16
    depformer_num_layers: int = 6
    depformer_multi_linear: bool = True
    depformer_weights_per_step: bool = True
    depformer_weights_per_step_schedule: list[int] | None = None
    depformer_low_rank_embeddings: int | None = None
    delays: list[int] = field(
        default_factory=lambda: [0, 0, 1, 1, 1, 1, 1, 1, 1, 0, 1, 1, 1, 1, 1, 1, 1]
    )
    # Linear heads on the temporal transformer's output, softmaxed (Kyutai's STT 1B: 4 "semantic
    # voice-activity" heads of 6 classes; head 2 > 0.5 reads as the end of the speaker's turn).
    extra_heads_num_heads: int = 0
    extra_heads_dim: int = 6
    # "stt": Kyutai's speech-to-text (dep_q 0: it reads the user's n_q codebooks, writes text);
    # ``stt_config`` gives its ``audio_delay_seconds`` and ``audio_silence_prefix_seconds``.
    model_type: str = "moshi"
    stt_config: dict | None = None
    # Ours, not upstream's: trained to take a voice and a text prompt before the conversation
    # (NVIDIA PersonaPlex); see ``LmGen.system_prompt``.
    persona: bool = False

    @classmethod
    def from_dict(cls, d: dict) -> LmConfig:
        """Read an upstream config dict; unknown keys are ignored, missing required ones named,
        and options we do not implement refused."""
        if not isinstance(d, dict):
            raise MoshiError(f"LM config must be an object, got {type(d).__name__}")
        required = _REQUIRED + (_REQUIRED_WITH_DEPFORMER if d.get("dep_q") != 0 else ())
        missing = [k for k in required if k not in d]
        if missing:
            raise MoshiError(f"LM config is missing required field(s): {', '.join(missing)}")
        for key, supported in _UNSUPPORTED_UNLESS.items():
            if key in d:
                choice("LM config", key, d[key], supported)
        names = {f.name for f in fields(cls)}
        d = {k: v for k, v in d.items() if k in names}
        if d.get("depformer_dim_feedforward") is None:
            dim = d.get("depformer_dim", cls.depformer_dim)
            if isinstance(dim, int) and isinstance(d.get("hidden_scale", 1.0), (int, float)):
                d["depformer_dim_feedforward"] = int(d.get("hidden_scale", cls.hidden_scale) * dim)
            else:
                d.pop("depformer_dim_feedforward", None)  # validate() names the bad field
        if d.get("model_type") is None:  # upstream's dialogue configs have none
            d["model_type"] = "stt" if d["dep_q"] == 0 else "moshi"
        if _predicts_user_stream(d):
            # PersonaPlex says dep_q = n_q: its depformer also predicts the user's codebooks,
            # which are always given. We generate Moshi's half only (the weights' extra steps
            # are dropped while loading, see ``weights.drop_user_depformer_steps``).
            half = d["n_q"] // 2
            d["dep_q"], d["persona"] = half, True
            schedule = d.get("depformer_weights_per_step_schedule")
            if schedule:
                d["depformer_weights_per_step_schedule"] = schedule[:half]
        cfg = cls(**d)
        cfg.validate()
        return cfg

    def validate(self) -> None:
        """Every field of the right type and range, and consistent with the others."""
        what = "LM config"
        for name in ("dim", "text_card", "card", "context", "depformer_dim",
                     "depformer_dim_feedforward"):  # fmt: skip
            integer(what, name, getattr(self, name))
        for name in ("n_q", "num_heads", "num_layers", "depformer_num_heads",
                     "depformer_num_layers"):  # fmt: skip
            integer(what, name, getattr(self, name), 1, MAX_COUNT)
        integer(what, "existing_text_padding_id", self.existing_text_padding_id, 0,
                self.text_card - 1)  # fmt: skip
        integer(what, "dep_q", self.dep_q, 0, self.n_q)
        integer(what, "extra_heads_num_heads", self.extra_heads_num_heads, 0, MAX_COUNT)
        integer(what, "extra_heads_dim", self.extra_heads_dim)
        choice(what, "model_type", self.model_type, MODEL_TYPES)
        if (self.model_type == "stt") != (self.dep_q == 0):
            raise MoshiError(
                f"{what}: model_type {self.model_type!r} with dep_q {self.dep_q}: a speech-to-text "
                "model has dep_q 0 (no depth transformer), a dialogue model dep_q > 0"
            )
        if self.stt_config is not None:
            if not isinstance(self.stt_config, dict):
                raise MoshiError(f"{what}: stt_config must be an object, got {self.stt_config!r}")
            for name in ("audio_delay_seconds", "audio_silence_prefix_seconds"):
                value = self.stt_config.get(name, 0.0)
                real = isinstance(value, (int, float)) and not isinstance(value, bool)
                if not real or not 0 <= value <= MAX_STT_SECONDS:  # NaN fails too
                    raise MoshiError(
                        f"{what}: stt_config.{name} must be a number of seconds in "
                        f"[0, {MAX_STT_SECONDS:g}], got {value!r}"
                    )
        number(what, "hidden_scale", self.hidden_scale)
        number(what, "max_period", self.max_period)
        flag(what, "depformer_multi_linear", self.depformer_multi_linear)
        flag(what, "depformer_weights_per_step", self.depformer_weights_per_step)
        flag(what, "persona", self.persona)
        integers(what, "delays", self.delays, 0, min(MAX_DELAY, self.context - 1), self.n_q + 1)
        if self.dim % self.num_heads or self.depformer_dim % self.depformer_num_heads:
            raise MoshiError(f"{what}: dim must be a multiple of num_heads (and for the depformer)")
        schedule = self.depformer_weights_per_step_schedule
        if schedule is not None:
            integers(what, "depformer_weights_per_step_schedule", schedule, 0, self.dep_q - 1,
                     self.dep_q)  # fmt: skip
        if self.depformer_low_rank_embeddings is not None:
            integer(what, "depformer_low_rank_embeddings", self.depformer_low_rank_embeddings)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def moshi_7b(cls) -> LmConfig:
        """Moshiko / Moshika 7B (``moshi_7b_202409.json``)."""
        return cls()

    @classmethod
    def personaplex_7b(cls) -> LmConfig:
        """NVIDIA PersonaPlex 7B (``nvidia/personaplex-7b-v1``): Moshiko's architecture, run
        with Moshi's 8 generated codebooks, trained for system prompts."""
        return cls(persona=True)

    @classmethod
    def moshi_2b(cls) -> LmConfig:
        """The 2B layout (``moshi_dev_2b.json``) without its LUT conditioner."""
        return cls(
            dim=2560,
            text_card=48000,
            n_q=32,
            dep_q=16,
            num_heads=20,
            num_layers=24,
            max_period=100000.0,
            delays=[0] + ([0] + [2] * 15) * 2,
        )

    @classmethod
    def stt_1b(cls) -> LmConfig:
        """Kyutai STT 1B (``kyutai/stt-1b-en_fr``): English and French, 0.5 s delay, 4 heads."""
        return cls.from_dict({**_STT, "dim": 2048, "text_card": 8000, "num_heads": 16,
                              "num_layers": 16, "context": 750, "extra_heads_num_heads": 4,
                              "stt_config": {"audio_delay_seconds": 0.5,
                                             "audio_silence_prefix_seconds": 0.0}})  # fmt: skip

    @classmethod
    def stt_2_6b(cls) -> LmConfig:
        """Kyutai STT 2.6B (``kyutai/stt-2.6b-en``): English, 2.5 s delay, 1 s silence first."""
        return cls.from_dict({**_STT, "dim": 2048, "text_card": 4000, "num_heads": 32,
                              "num_layers": 48, "context": 375,
                              "stt_config": {"audio_delay_seconds": 2.5,
                                             "audio_silence_prefix_seconds": 1.0}})  # fmt: skip

    # Derived sizes ------------------------------------------------------------------------

    @property
    def hidden_dim(self) -> int:
        return _gated_hidden(int(self.hidden_scale * self.dim), self.dim)

    @property
    def depformer_hidden_dim(self) -> int:
        return _gated_hidden(self.depformer_dim_feedforward, self.depformer_dim)

    @property
    def schedule(self) -> list[int]:
        """Weight set used by each depformer step."""
        if self.depformer_weights_per_step_schedule is not None:
            return list(self.depformer_weights_per_step_schedule)
        if self.depformer_weights_per_step:
            return list(range(self.dep_q))
        return [0] * self.dep_q

    @property
    def is_stt(self) -> bool:
        """Kyutai's speech-to-text: no depth transformer, one text token per frame."""
        return self.dep_q == 0

    @property
    def stt_delay_seconds(self) -> float:
        """How far the text lags the audio (``stt_config.audio_delay_seconds``)."""
        return float((self.stt_config or {}).get("audio_delay_seconds", 0.0))

    @property
    def stt_prefix_seconds(self) -> float:
        """Silence fed before the audio (``stt_config.audio_silence_prefix_seconds``)."""
        return float((self.stt_config or {}).get("audio_silence_prefix_seconds", 0.0))

    @property
    def max_delay(self) -> int:
        return max(self.delays)

    @property
    def n_user(self) -> int:
        """Codebooks of the user's audio stream (Moshi's own are ``dep_q``)."""
        return self.n_q - self.dep_q

    @property
    def mimi_codebooks(self) -> int:
        """Mimi codebooks the model needs: enough to encode the user and decode Moshi."""
        return max(self.dep_q, self.n_user)


# What Kyutai's two STT configs share (their released config.json files).
_STT = {"n_q": 32, "dep_q": 0, "card": 2048, "hidden_scale": 4.125, "max_period": 100000.0,
        "delays": [0] * 33, "model_type": "stt", "depformer_dim": 1024,
        "depformer_num_heads": 16, "depformer_num_layers": 6}  # fmt: skip


def _predicts_user_stream(d: dict) -> bool:
    """Whether an upstream config's depformer covers all ``n_q`` audio codebooks of a
    full-duplex model: two halves (Moshi's, the user's) with the same delays."""
    n_q, delays = d["n_q"], d["delays"]
    if type(n_q) is not int or not isinstance(delays, list):
        return False  # validate() names the field
    half = n_q // 2
    return (
        d["dep_q"] == n_q
        and n_q % 2 == 0
        and len(delays) == n_q + 1
        and delays[1 : 1 + half] == delays[1 + half :]
    )


def _gated_hidden(dim_feedforward: int, dim: int) -> int:
    # PyTorch ActivationGating: a 4x FFN becomes 21/8 x, otherwise 2/3 of dim_feedforward.
    return 21 * dim // 8 if dim_feedforward == 4 * dim else 2 * dim_feedforward // 3


class GatedMLP(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.linear_in = nn.Linear(dim, 2 * hidden, bias=False)
        self.linear_out = nn.Linear(hidden, dim, bias=False)

    def __call__(self, x: mx.array) -> mx.array:
        gate, value = mx.split(self.linear_in(x), 2, axis=-1)
        return self.linear_out(nn.silu(gate) * value)


class TransformerLayer(nn.Module):
    def __init__(self, cfg: LmConfig):
        super().__init__()
        self.norm1 = nn.RMSNorm(cfg.dim, eps=1e-8)
        self.self_attn = SelfAttention(cfg.dim, cfg.num_heads, cfg.max_period)
        self.norm2 = nn.RMSNorm(cfg.dim, eps=1e-8)
        self.gating = GatedMLP(cfg.dim, cfg.hidden_dim)

    def __call__(self, x: mx.array, mask, cache=None) -> mx.array:
        x = x + self.self_attn(self.norm1(x), mask, cache)
        return x + self.gating(self.norm2(x))


class Transformer(nn.Module):
    def __init__(self, cfg: LmConfig):
        super().__init__()
        self.layers = [TransformerLayer(cfg) for _ in range(cfg.num_layers)]


class DepformerLayer(nn.Module):
    """One depformer layer holding a weight set per step (stacked attention projections, one
    gated MLP per set); the norms are shared by all steps. No positional encoding."""

    def __init__(self, cfg: LmConfig):
        super().__init__()
        dim, n_sets = cfg.depformer_dim, max(cfg.schedule) + 1
        self.num_heads = cfg.depformer_num_heads
        self.norm1 = nn.RMSNorm(dim, eps=1e-8)
        self.self_attn = _StackedAttention(dim, n_sets)
        self.norm2 = nn.RMSNorm(dim, eps=1e-8)
        self.gating = [GatedMLP(dim, cfg.depformer_hidden_dim) for _ in range(n_sets)]

    def __call__(self, x: mx.array, sets: list[int], cache) -> mx.array:
        """``x`` ``[N, S, dim]``: position ``s`` uses weight set ``sets[s]``; causal over ``S``."""
        h = self.norm1(x)
        qkv = mx.concatenate(
            [self.self_attn.in_proj(h[:, s : s + 1], w) for s, w in enumerate(sets)], axis=1
        )
        out = self_attention(qkv, self.num_heads, attention_mask(x, cache), cache)
        x = x + mx.concatenate(
            [self.self_attn.out_proj(out[:, s : s + 1], w) for s, w in enumerate(sets)], axis=1
        )
        h = self.norm2(x)
        return x + mx.concatenate(
            [self.gating[w](h[:, s : s + 1]) for s, w in enumerate(sets)], axis=1
        )


class _StackedAttention(nn.Module):
    def __init__(self, dim: int, n_sets: int):
        super().__init__()
        self.in_proj = MultiLinear(dim, 3 * dim, n_sets)
        self.out_proj = MultiLinear(dim, dim, n_sets)


class Depformer(nn.Module):
    def __init__(self, cfg: LmConfig):
        super().__init__()
        self.layers = [DepformerLayer(cfg) for _ in range(cfg.depformer_num_layers)]


class Lm(nn.Module):
    """Temporal transformer + depformer (none when ``dep_q`` is 0: speech-to-text) + the extra
    heads. Parameter names follow the released checkpoint."""

    def __init__(self, cfg: LmConfig | None = None):
        super().__init__()
        cfg = cfg or LmConfig()
        cfg.validate()
        self.cfg = cfg
        low_rank = cfg.depformer_low_rank_embeddings
        dd = cfg.depformer_dim
        self.text_emb = ZeroEmbedding(cfg.text_card + 1, cfg.dim)
        self.emb = [ZeroEmbedding(cfg.card + 1, cfg.dim) for _ in range(cfg.n_q)]
        self.transformer = Transformer(cfg)
        self.out_norm = nn.RMSNorm(cfg.dim, eps=1e-8)
        self.text_linear = nn.Linear(cfg.dim, cfg.text_card, bias=False)
        self.extra_heads = [
            nn.Linear(cfg.dim, cfg.extra_heads_dim, bias=False)
            for _ in range(cfg.extra_heads_num_heads)
        ]
        if cfg.dep_q == 0:  # speech-to-text: no depth transformer at all
            self.depformer_in, self.depformer_emb, self.linears = [], [], []
            return
        n_in = cfg.dep_q if cfg.depformer_multi_linear else 1
        self.depformer_in = [nn.Linear(cfg.dim, dd, bias=False) for _ in range(n_in)]
        self.depformer_text_emb = ZeroEmbedding(cfg.text_card + 1, dd, low_rank)
        self.depformer_emb = [
            ZeroEmbedding(cfg.card + 1, dd, low_rank) for _ in range(cfg.dep_q - 1)
        ]
        self.depformer = Depformer(cfg)
        self.linears = [nn.Linear(dd, cfg.card, bias=False) for _ in range(cfg.dep_q)]

    # -- temporal transformer ------------------------------------------------------------------

    def embed(self, tokens: mx.array) -> mx.array:
        """``[B, n_q + 1, T]`` delayed input tokens -> summed embeddings ``[B, T, dim]``."""
        x = self.emb[0](tokens[:, 1])
        for k in range(1, self.cfg.n_q):
            x = x + self.emb[k](tokens[:, k + 1])
        return x + self.text_emb(tokens[:, 0])

    def temporal(self, x: mx.array, cache: list | None = None) -> tuple[mx.array, mx.array]:
        """Summed embeddings ``[B, T, dim]`` -> (normed hidden state ``z``, text logits), causal
        over a window of ``context`` steps. With ``cache`` (``make_cache``), ``x`` continues
        the cached steps: one step or a prefill of many give the same result."""
        mask = attention_mask(x, cache[0] if cache else None, window=self.cfg.context)
        for i, layer in enumerate(self.transformer.layers):
            x = boundary(layer(x, mask, cache[i] if cache is not None else None))
        z = self.out_norm(x)
        return z, self.text_linear(z)

    def extra_head_probs(self, z: mx.array) -> mx.array | None:
        """The extra heads' probabilities ``[..., heads, extra_heads_dim]`` (float32) of the
        normed hidden state ``z`` ``[..., dim]``; None for a model without heads."""
        if not self.extra_heads:
            return None
        logits = mx.stack([head(z) for head in self.extra_heads], axis=-2)
        return mx.softmax(logits.astype(mx.float32), axis=-1)

    def make_cache(self) -> list[RotatingKVCache]:
        """Rolling KV caches of ``context`` steps: memory stays bounded however long the talk."""
        return [RotatingKVCache(max_size=self.cfg.context) for _ in self.transformer.layers]

    # -- depformer -----------------------------------------------------------------------------

    def depformer_input(self, z: mx.array, k: int, prev: mx.array) -> mx.array:
        """Input of depformer step ``k``: projected context + embedding of the previous token."""
        proj = self.depformer_in[k if len(self.depformer_in) > 1 else 0](z)
        emb = self.depformer_text_emb(prev) if k == 0 else self.depformer_emb[k - 1](prev)
        return proj + emb

    def depformer_layers(self, x: mx.array, steps: list[int], caches: list) -> mx.array:
        sets = [self.cfg.schedule[k] for k in steps]
        for layer, cache in zip(self.depformer.layers, caches, strict=True):
            x = layer(x, sets, cache)
        return x

    def new_depformer_cache(self) -> list[ConcatenateKVCache]:
        # At most dep_q entries, rebuilt every frame: plain concatenation is cheapest.
        return [ConcatenateKVCache() for _ in self.depformer.layers]

    # -- teacher forcing -----------------------------------------------------------------------

    def __call__(self, codes: mx.array):
        """Teacher-forced forward with upstream ``LMModel.forward`` semantics.

        ``codes``: ``[B, n_q + 1, T]`` int, undelayed (row 0 text, rows 1..dep_q Moshi's audio,
        the rest the user's audio); -1 marks "no input". Returns ``(text_logits [B, 1, T,
        text_card], audio_logits [B, dep_q, T, card], text_mask [B, 1, T], audio_mask [B, dep_q,
        T])``. Audio logits are NaN in the last ``delay`` frames of each codebook (never
        predicted); the masks are also False where the code is -1.
        """
        cfg = self.cfg
        self.check_codes(codes)
        codes = codes.astype(mx.int32)
        B, S, T = codes.shape
        delayed = self.delay(codes)
        initial = self.initial_tokens()[None, :, None]
        model_input = mx.concatenate([mx.broadcast_to(initial, (B, S, 1)), delayed[:, :, :-1]], 2)
        z, text_logits = self.temporal(self.embed(model_input))

        text_logits = text_logits.astype(mx.float32)[:, None]
        text_mask = codes[:, :1] >= 0
        K, N = cfg.dep_q, B * T
        if K == 0:  # speech-to-text: text only
            empty = mx.zeros((B, 0, T, cfg.card), mx.float32)
            return text_logits, empty, text_mask, mx.zeros((B, 0, T), mx.bool_)
        # Depformer over all steps at once; step k's input token is the target of stream k.
        zf = z.reshape(N, 1, -1)
        targets = delayed.transpose(0, 2, 1).reshape(N, S)
        x = mx.concatenate(
            [self.depformer_input(zf, k, targets[:, k : k + 1]) for k in range(K)], axis=1
        )
        h = self.depformer_layers(x, list(range(K)), self.new_depformer_cache())
        logits = mx.stack([self.linears[k](h[:, k]) for k in range(K)], axis=1)
        logits = logits.reshape(B, T, K, -1).transpose(0, 2, 1, 3).astype(mx.float32)

        # Undo the delays: frame f of codebook k was predicted at delayed position f + d.
        frames = mx.arange(T)
        audio_logits, audio_mask = [], []
        for k in range(K):
            d = cfg.delays[k + 1]
            shifted = mx.concatenate(
                [logits[:, k, d:], mx.full((B, d, logits.shape[-1]), mx.nan)], axis=1
            )
            audio_logits.append(shifted)
            audio_mask.append((frames[None] + d < T) & (codes[:, k + 1] >= 0))
        return (
            text_logits,
            mx.stack(audio_logits, axis=1),
            text_mask,
            mx.stack(audio_mask, axis=1),
        )

    def check_codes(self, codes) -> None:
        """``MoshiError`` unless ``codes`` is an integer ``[B, n_q + 1, T]`` mx.array with text
        ids in [-1, text_card) and audio codes in [-1, card): the embeddings gather with them,
        and an id past a table would read other memory."""
        cfg = self.cfg
        if not isinstance(codes, mx.array) or not mx.issubdtype(codes.dtype, mx.integer):
            kind = (
                f"{codes.dtype} mx.array" if isinstance(codes, mx.array) else type(codes).__name__
            )
            raise MoshiError(f"`codes` must be an integer mx.array, got {kind}")
        if codes.ndim != 3 or codes.shape[1] != cfg.n_q + 1 or 0 in codes.shape:
            raise MoshiError(
                f"`codes` must be [batch, {cfg.n_q + 1}, time], got {list(codes.shape)}"
            )
        for name, rows, card in (("text", codes[:, :1], cfg.text_card),
                                 ("audio", codes[:, 1:], cfg.card)):  # fmt: skip
            lo, hi = mx.min(rows).item(), mx.max(rows).item()
            if lo < -1 or hi >= card:
                raise MoshiError(
                    f"`codes`: {name} ids must be in [-1, {card}), got values in [{lo}, {hi}]"
                )

    def initial_tokens(self) -> mx.array:
        """Start token of each stream: ``text_card`` for text, ``card`` for audio."""
        return mx.array([self.cfg.text_card] + [self.cfg.card] * self.cfg.n_q, dtype=mx.int32)

    def delay(self, codes: mx.array) -> mx.array:
        """Shift stream ``s`` right by ``delays[s]``, filling with its initial token."""
        B, S, T = codes.shape
        init = self.initial_tokens()
        rows = []
        for s, d in enumerate(self.cfg.delays):
            fill = mx.full((B, min(d, T)), init[s], dtype=codes.dtype)
            rows.append(mx.concatenate([fill, codes[:, s, : T - d]], axis=1) if d else codes[:, s])
        return mx.stack(rows, axis=1)
