"""Full-duplex streaming generation: one call per 80 ms frame, as upstream's ``LMGen.step``."""

from __future__ import annotations

import mlx.core as mx
from mlx_lm.sample_utils import make_sampler

from .lm import Lm


def _sampler(temp: float, top_k: int, top_p: float, vocab: int):
    """Sampling as upstream: the distribution is ``softmax(logits / temp)``, restricted to its
    ``top_k`` most likely tokens, or to the smallest set holding ``top_p`` of the probability,
    when those are set. Temperature 0 is argmax. Built on mlx-lm's samplers."""
    if temp == 0:
        return make_sampler(temp=0.0)
    # mlx-lm filters log-probabilities before its own temperature: give it tempered ones.
    # A top-k of at least the vocabulary is plain sampling (mlx-lm refuses it as a top-k).
    filtered = make_sampler(temp=1.0, top_k=top_k if 0 < top_k < vocab else 0, top_p=top_p)

    def sample(logits: mx.array) -> mx.array:
        logits = logits / temp
        return filtered(logits - mx.logsumexp(logits, axis=-1, keepdims=True))

    return sample


class LmGen:
    """Streams Moshi: feed the user's codes of each frame, get Moshi's text and audio back.

    ``step(user_codes [B, n_q - dep_q])`` returns ``[B, 1 + dep_q]`` int32 (text token, then
    Moshi's audio codes of one frame, undelayed) or ``None`` while the delays fill (the first
    ``max_delay`` calls). User codes passed at step ``t`` are read at step ``t + delay`` (those
    of step 0 never reach the model), exactly as upstream's PyTorch ``LMGen``. Temperature 0
    means greedy; ``top_p`` / ``top_p_text`` (0 = off) give upstream MLX's nucleus sampling.
    The temporal KV cache is a rolling window of ``context`` steps, so a conversation can go on
    forever in bounded memory. After each step, ``last_input``, ``last_text_logits`` and
    ``last_audio_logits`` hold the tokens the model read and the logits it sampled from.
    """

    def __init__(
        self,
        lm: Lm,
        temp: float = 0.8,
        temp_text: float = 0.7,
        top_k: int = 250,
        top_k_text: int = 25,
        seed: int | None = None,
        *,
        top_p: float = 0.0,
        top_p_text: float = 0.0,
    ):
        self.lm = lm
        cfg = lm.cfg
        self.cfg = cfg
        self.text_sampler = _sampler(temp_text, top_k_text, top_p_text, cfg.text_card)
        self.audio_sampler = _sampler(temp, top_k, top_p, cfg.card)
        if seed is not None:
            mx.random.seed(seed)
        # One compiled graph for the 8 sequential depformer passes and their sampling.
        self._depformer = mx.compile(
            self.depformer_step, inputs=mx.random.state, outputs=mx.random.state
        )
        self.reset()

    def reset(self) -> None:
        """Start a new conversation (clears the KV cache and the delay buffer)."""
        self.offset = 0
        self.cache = self.lm.make_cache()
        self._ring = self.cfg.max_delay + 2
        # tokens[s][slot]: delayed-time tokens of stream s, written before they are read.
        self.tokens: list[list[mx.array | None]] = [
            [None] * self._ring for _ in range(self.cfg.n_q + 1)
        ]

    def _check_user_codes(self, user_codes) -> mx.array:
        cfg = self.cfg
        user_codes = mx.array(user_codes)
        n_user = cfg.n_q - cfg.dep_q
        if user_codes.ndim != 2 or user_codes.shape[1] != n_user:
            raise ValueError(
                f"user_codes must be [batch, {n_user}] (one frame of the user's {n_user} "
                f"codebooks), got shape {list(user_codes.shape)}"
            )
        if mx.issubdtype(user_codes.dtype, mx.floating):
            raise ValueError("user_codes must be integers")
        lo, hi = mx.min(user_codes).item(), mx.max(user_codes).item()
        if lo < 0 or hi >= cfg.card:
            raise ValueError(f"user_codes must be in [0, {cfg.card}), got values in [{lo}, {hi}]")
        return user_codes.astype(mx.int32)

    def model_input(self, batch: int) -> mx.array:
        """Tokens the temporal transformer reads at the current step, ``[B, n_q + 1]``."""
        init = self.lm.initial_tokens()
        slot = self.offset % self._ring
        return mx.stack(
            [
                self.tokens[s][slot] if self.offset > d else mx.full((batch,), init[s], mx.int32)
                for s, d in enumerate(self.cfg.delays)
            ],
            axis=1,
        )

    def step(self, user_codes, check: bool = True) -> mx.array | None:
        """One frame. ``check=False`` skips validating ``user_codes`` on the host (one sync),
        for callers whose codes come straight from Mimi. The result is being evaluated
        asynchronously when returned."""
        cfg, lm = self.cfg, self.lm
        user_codes = self._check_user_codes(user_codes) if check else user_codes.astype(mx.int32)
        first_user = cfg.dep_q + 1
        for i in range(cfg.n_q - cfg.dep_q):
            s = first_user + i
            self.tokens[s][(self.offset + cfg.delays[s]) % self._ring] = user_codes[:, i]
        tokens = self.last_input = self.model_input(user_codes.shape[0])
        z, text_logits = lm.temporal(lm.embed(tokens[:, :, None]), self.cache)
        self.last_text_logits = text_logits[:, -1].astype(mx.float32)
        text = self.text_sampler(self.last_text_logits)
        audio, audio_logits = self._depformer(z, text)
        self.last_audio_logits = [audio_logits[:, k] for k in range(cfg.dep_q)]

        self.offset += 1
        slot = self.offset % self._ring
        self.tokens[0][slot] = text
        for k in range(cfg.dep_q):
            self.tokens[k + 1][slot] = audio[:, k]
        if self.offset <= cfg.max_delay:
            mx.eval(text, audio)
            return None
        out = [
            self.tokens[s][(self.offset - cfg.max_delay + cfg.delays[s]) % self._ring]
            for s in range(cfg.dep_q + 1)
        ]
        out = mx.stack(out, axis=1).astype(mx.int32)
        mx.async_eval(out)
        return out

    def depformer_step(self, z: mx.array, text: mx.array) -> tuple[mx.array, mx.array]:
        """Sample Moshi's ``dep_q`` audio codes for this step, one codebook after the other.

        Returns the codes ``[B, dep_q]`` and their logits ``[B, dep_q, card]`` (float32).
        """
        lm = self.lm
        cache = lm.new_depformer_cache()
        prev = text
        audio, logits = [], []
        for k in range(self.cfg.dep_q):
            x = lm.depformer_input(z, k, prev[:, None])
            h = lm.depformer_layers(x, [k], cache)
            logits.append(lm.linears[k](h[:, -1]).astype(mx.float32))
            prev = self.audio_sampler(logits[-1])
            audio.append(prev)
        return mx.stack(audio, axis=1), mx.stack(logits, axis=1)
