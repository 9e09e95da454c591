"""Full-duplex streaming generation: one call per 80 ms frame, as upstream's ``LMGen.step``."""

from __future__ import annotations

import secrets
import time

import mlx.core as mx

from .errors import MoshiError
from .lm import Lm
from .pieces import boundary, evaluating_in_pieces
from .sampling import Sampling, token_sampler

STAGES = ("temporal", "depth")  # what ``step(..., timings=...)`` reports


class LmGen:
    """Streams Moshi: feed the user's codes of each frame, get Moshi's text and audio back.

    ``step(user_codes [B, n_q - dep_q])`` returns ``[B, 1 + dep_q]`` int32 (text token, then
    Moshi's audio codes of one frame, undelayed) or ``None`` while the delays fill (the first
    ``max_delay`` calls). User codes passed at step ``t`` are read at step ``t + delay`` (those
    of step 0 never reach the model), exactly as upstream's PyTorch ``LMGen``.

    Sampling is a ``Sampling`` (or its fields as keywords: ``LmGen(lm, temp=0, seed=1)``); the
    generator owns its random state, so two generators never disturb each other and one with
    a seed replays exactly (``reset`` rewinds it). The temporal KV cache is a rolling window of
    ``context`` steps, so a conversation can go on forever in bounded memory. After each step,
    ``last_input``, ``last_text_logits`` and ``last_audio_logits`` hold the tokens the model
    read and the logits it sampled from.
    """

    def __init__(self, lm: Lm, sampling: Sampling | None = None, **fields):
        if sampling is not None and fields:
            raise MoshiError("LmGen takes a Sampling or its fields as keywords, not both")
        self.sampling = sampling = sampling or Sampling(**fields)
        self.lm = lm
        self.cfg = cfg = lm.cfg
        self.text_sampler = token_sampler(
            sampling.temp_text, sampling.top_k_text, sampling.top_p_text, cfg.text_card
        )
        self.audio_sampler = token_sampler(sampling.temp, sampling.top_k, sampling.top_p, cfg.card)
        self.seed = sampling.seed if sampling.seed is not None else secrets.randbits(63)
        # One compiled graph for the dep_q sequential depformer passes and their sampling
        # (evaluated in pieces, ``moshi_mlx.pieces``, it runs uncompiled: same results).
        self._depformer = mx.compile(self.depformer_step)
        self.reset()

    def reset(self) -> None:
        """Start a new conversation: clears the KV cache and the delay buffer, and rewinds the
        random state to the seed."""
        self.offset = 0
        self.cache = self.lm.make_cache()
        self.key = mx.random.key(self.seed)
        self._ring = self.cfg.max_delay + 2
        # tokens[s][slot]: delayed-time tokens of stream s, written before they are read.
        self.tokens: list[list[mx.array | None]] = [
            [None] * self._ring for _ in range(self.cfg.n_q + 1)
        ]
        self._batch: int | None = None

    def _check_user_codes(self, user_codes) -> mx.array:
        cfg = self.cfg
        if not isinstance(user_codes, mx.array):
            raise MoshiError(f"user_codes must be an mx.array, got {type(user_codes).__name__}")
        if user_codes.ndim != 2 or user_codes.shape[1] != cfg.n_user or user_codes.shape[0] < 1:
            raise MoshiError(
                f"user_codes must be [batch, {cfg.n_user}] (one frame of the user's "
                f"{cfg.n_user} codebooks), got shape {list(user_codes.shape)}"
            )
        if not mx.issubdtype(user_codes.dtype, mx.integer):
            raise MoshiError(f"user_codes must be integers, got {user_codes.dtype}")
        lo, hi = mx.min(user_codes).item(), mx.max(user_codes).item()
        if lo < 0 or hi >= cfg.card:
            raise MoshiError(f"user_codes must be in [0, {cfg.card}), got values in [{lo}, {hi}]")
        if self._batch is not None and user_codes.shape[0] != self._batch:
            raise MoshiError(
                f"user_codes has batch size {user_codes.shape[0]} but this conversation "
                f"started with {self._batch}; call reset() to change it"
            )
        return user_codes

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

    def step(
        self, user_codes: mx.array, check: bool = True, timings: dict | None = None
    ) -> mx.array | None:
        """One frame. The result is being evaluated asynchronously when returned.

        ``check=False`` skips validating ``user_codes`` on the host (one sync); only for codes
        that come from our own code (Mimi's encoder), never from a caller. With ``timings``
        (a dict), each stage is evaluated on its own and its wall time in ms is stored under
        ``"temporal"`` (transformer and text sampling) and ``"depth"`` (depformer and audio
        sampling): slower, for profiling.
        """
        cfg, lm = self.cfg, self.lm
        if check:
            user_codes = self._check_user_codes(user_codes)
        user_codes = user_codes.astype(mx.int32)
        self._batch = user_codes.shape[0]
        for i in range(cfg.n_user):
            s = cfg.dep_q + 1 + i
            self.tokens[s][(self.offset + cfg.delays[s]) % self._ring] = user_codes[:, i]
        self.key, text_key, audio_key = mx.random.split(self.key, 3)
        t0 = time.perf_counter()

        tokens = self.last_input = self.model_input(user_codes.shape[0])
        z, text_logits = lm.temporal(lm.embed(tokens[:, :, None]), self.cache)
        self.last_text_logits = text_logits[:, -1].astype(mx.float32)
        text = self.text_sampler(self.last_text_logits, text_key)
        if timings is not None:
            mx.eval(text, z)
            t1 = time.perf_counter()
            timings["temporal"] = 1000 * (t1 - t0)

        depformer = self.depformer_step if evaluating_in_pieces() else self._depformer
        audio, audio_logits = depformer(z, text, audio_key)
        self.last_audio_logits = [audio_logits[:, k] for k in range(cfg.dep_q)]
        if timings is not None:
            mx.eval(audio)
            timings["depth"] = 1000 * (time.perf_counter() - t1)

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

    def depformer_step(
        self, z: mx.array, text: mx.array, key: mx.array
    ) -> tuple[mx.array, mx.array]:
        """Sample Moshi's ``dep_q`` audio codes for this step, one codebook after the other.

        Returns the codes ``[B, dep_q]`` and their logits ``[B, dep_q, card]`` (float32).
        """
        lm = self.lm
        cache = lm.new_depformer_cache()
        keys = mx.random.split(key, self.cfg.dep_q)
        prev = text
        audio, logits = [], []
        for k in range(self.cfg.dep_q):
            x = lm.depformer_input(z, k, prev[:, None])
            h = lm.depformer_layers(x, [k], cache)
            logits.append(lm.linears[k](h[:, -1]).astype(mx.float32))
            prev = boundary(self.audio_sampler(logits[-1], keys[k]))
            audio.append(prev)
        return mx.stack(audio, axis=1), mx.stack(logits, axis=1)
