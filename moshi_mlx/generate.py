"""Full-duplex streaming generation: one call per 80 ms frame, as upstream's ``LMGen.step``, with
optional teacher forcing of Moshi's own tokens."""

from __future__ import annotations

import secrets
import time

import mlx.core as mx

from .errors import MoshiError
from .lm import Lm
from .sampling import Sampling, token_sampler

STAGES = ("temporal", "depth")  # what ``step(..., timings=...)`` reports


class LmGen:
    """Streams Moshi: feed the user's codes of each frame, get Moshi's text and audio back.

    ``step(user_codes [B, n_q - dep_q])`` returns ``[B, 1 + dep_q]`` int32 (text token, then
    Moshi's audio codes of one frame, undelayed) or ``None`` while the delays fill (the first
    ``max_delay`` calls). User codes passed at step ``t`` are read at step ``t + delay`` (those
    of step 0 never reach the model), exactly as upstream's PyTorch ``LMGen``. Moshi's own
    audio and text can be given the same way (teacher forcing); what is not given is sampled.

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
        # One compiled graph for the dep_q sequential depformer passes and their sampling;
        # forcing is data (a mask), so forced and free steps share it.
        self._depformer = mx.compile(self.depformer_step)
        self.reset()

    def reset(self) -> None:
        """Start a new conversation: clears the KV cache and the delay buffer, and rewinds the
        random state to the seed."""
        self.offset = 0
        self.cache = self.lm.make_cache()
        self.key = mx.random.key(self.seed)
        self._ring = self.cfg.max_delay + 2
        streams = self.cfg.n_q + 1
        # tokens[s][p % ring]: token of stream s at delayed position p, written before it is
        # read; given_at[s][p % ring] == p when the caller gave it (sampling must keep it).
        self.tokens: list[list[mx.array | None]] = [[None] * self._ring for _ in range(streams)]
        self.given_at: list[list[int]] = [[-1] * self._ring for _ in range(streams)]
        self._batch: int | None = None

    # -- input checks --------------------------------------------------------------------------

    def _check_codes(self, name: str, codes, shape: tuple, card: int, what: str) -> None:
        """``codes``: an mx.array of integers in ``[0, card)`` shaped like ``shape`` (an int:
        that size; a name: any size >= 1); else a MoshiError naming ``name``."""
        if not isinstance(codes, mx.array):
            raise MoshiError(f"{name} must be an mx.array, got {type(codes).__name__}")
        fits = codes.ndim == len(shape) and all(
            n >= 1 if isinstance(want, str) else n == want
            for n, want in zip(codes.shape, shape, strict=True)
        )
        if not fits:
            expected = ", ".join(map(str, shape))
            raise MoshiError(f"{name} must be [{expected}] ({what}), got shape {list(codes.shape)}")
        if not mx.issubdtype(codes.dtype, mx.integer):
            raise MoshiError(f"{name} must be integers, got {codes.dtype}")
        lo, hi = mx.min(codes).item(), mx.max(codes).item()
        if lo < 0 or hi >= card:
            raise MoshiError(f"{name} must be in [0, {card}), got values in [{lo}, {hi}]")

    def _check_batch(self, name: str, size: int) -> None:
        if self._batch is not None and size != self._batch:
            raise MoshiError(
                f"{name} has batch size {size} but this conversation started with "
                f"{self._batch}; call reset() to change it"
            )

    def _given_streams(self, user_codes, moshi_codes, text_token, check: bool) -> dict:
        """The tokens given for this frame, ``{stream: [B] int32}``."""
        cfg = self.cfg
        if check:
            args = [("user_codes", user_codes, ("batch", cfg.n_user), cfg.card,
                     "one frame of the user's audio codes")]  # fmt: skip
            if moshi_codes is not None:
                args.append(("moshi_codes", moshi_codes, ("batch", cfg.dep_q), cfg.card,
                             "one frame of Moshi's audio codes"))  # fmt: skip
            if text_token is not None:
                args.append(("text_token", text_token, ("batch",), cfg.text_card,
                             "Moshi's text token"))  # fmt: skip
            for name, codes, *rest in args:
                self._check_codes(name, codes, *rest)
                self._check_batch(name, codes.shape[0])
            sizes = {name: codes.shape[0] for name, codes, *_ in args}
            if len(set(sizes.values())) > 1:
                raise MoshiError(f"the given codes differ in batch size: {sizes}")
        self._batch = user_codes.shape[0]
        given = {cfg.dep_q + 1 + i: user_codes[:, i] for i in range(cfg.n_user)}
        if moshi_codes is not None:
            given.update({1 + k: moshi_codes[:, k] for k in range(cfg.dep_q)})
        if text_token is not None:
            given[0] = text_token
        return {s: codes.astype(mx.int32) for s, codes in given.items()}

    # -- one frame -----------------------------------------------------------------------------

    def _write_given(self, given: dict[int, mx.array]) -> None:
        """Write this frame's given tokens at their delayed positions ``offset + delay``."""
        if self.offset == 0:
            return  # frame 0 never reaches the model: every stream starts on its initial token
        for s, codes in given.items():
            position = self.offset + self.cfg.delays[s]
            self.tokens[s][position % self._ring] = codes
            self.given_at[s][position % self._ring] = position

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

    def _forced_next(self, batch: int) -> tuple[mx.array, mx.array]:
        """Given tokens among those this step produces (text and Moshi's audio at position
        ``offset + 1``): ``(tokens [B, 1 + dep_q], mask [1 + dep_q])``."""
        position = self.offset + 1
        slot = position % self._ring
        mask = [self.given_at[s][slot] == position for s in range(self.cfg.dep_q + 1)]
        zeros = mx.zeros((batch,), mx.int32)
        tokens = [self.tokens[s][slot] if m else zeros for s, m in enumerate(mask)]
        return mx.stack(tokens, axis=1), mx.array(mask)

    def step(
        self,
        user_codes: mx.array,
        *,
        moshi_codes: mx.array | None = None,
        text_token: mx.array | None = None,
        check: bool = True,
        timings: dict | None = None,
    ) -> mx.array | None:
        """One frame. The result is being evaluated asynchronously when returned.

        ``moshi_codes`` ``[B, dep_q]`` / ``text_token`` ``[B]``: Moshi's own audio frame / text
        token for this frame, given like the user's (read at this step plus their delay, never
        replaced by samples; a given code the depth transformer produces at this step feeds
        its next codebook instead of a sample). ``check=False`` skips validating the codes on
        the host (one sync each); only for codes that come from our own code (Mimi's encoder),
        never from a caller. With ``timings`` (a dict), each stage is evaluated on its own and
        its wall time in ms is stored under ``"temporal"`` (transformer and text sampling) and
        ``"depth"`` (depformer and audio sampling): slower, for profiling.
        """
        cfg, lm = self.cfg, self.lm
        self._write_given(self._given_streams(user_codes, moshi_codes, text_token, check))
        batch = user_codes.shape[0]
        self.key, text_key, audio_key = mx.random.split(self.key, 3)
        t0 = time.perf_counter()

        tokens = self.last_input = self.model_input(batch)
        z, text_logits = lm.temporal(lm.embed(tokens[:, :, None]), self.cache)
        self.last_text_logits = text_logits[:, -1].astype(mx.float32)
        text = self.text_sampler(self.last_text_logits, text_key)
        if timings is not None:
            mx.eval(text, z)
            t1 = time.perf_counter()
            timings["temporal"] = 1000 * (t1 - t0)

        forced, mask = self._forced_next(batch)
        produced, audio_logits = self._depformer(z, text, forced, mask, audio_key)
        self.last_audio_logits = [audio_logits[:, k] for k in range(cfg.dep_q)]
        if timings is not None:
            mx.eval(produced)
            timings["depth"] = 1000 * (time.perf_counter() - t1)

        self.offset += 1
        slot = self.offset % self._ring
        for s in range(cfg.dep_q + 1):
            self.tokens[s][slot] = produced[:, s]
        if self.offset <= cfg.max_delay:
            mx.eval(produced)
            return None
        out = [
            self.tokens[s][(self.offset - cfg.max_delay + cfg.delays[s]) % self._ring]
            for s in range(cfg.dep_q + 1)
        ]
        out = mx.stack(out, axis=1).astype(mx.int32)
        mx.async_eval(out)
        return out

    def depformer_step(
        self, z: mx.array, text: mx.array, forced: mx.array, mask: mx.array, key: mx.array
    ) -> tuple[mx.array, mx.array]:
        """Moshi's text and ``dep_q`` audio codes for this step, one codebook after the other.

        ``text`` ``[B]`` is the sampled text token; ``forced`` ``[B, 1 + dep_q]`` holds given
        tokens where ``mask`` ``[1 + dep_q]`` is True: they replace the samples and feed the
        next codebook. Returns the tokens ``[B, 1 + dep_q]`` (text first) and the audio logits
        ``[B, dep_q, card]`` (float32).
        """
        lm = self.lm
        cache = lm.new_depformer_cache()
        keys = mx.random.split(key, self.cfg.dep_q)
        prev = mx.where(mask[0], forced[:, 0], text)
        produced, logits = [prev], []
        for k in range(self.cfg.dep_q):
            x = lm.depformer_input(z, k, prev[:, None])
            h = lm.depformer_layers(x, [k], cache)
            logits.append(lm.linears[k](h[:, -1]).astype(mx.float32))
            sampled = self.audio_sampler(logits[-1], keys[k])
            prev = mx.where(mask[k + 1], forced[:, k + 1], sampled)
            produced.append(prev)
        return mx.stack(produced, axis=1), mx.stack(logits, axis=1)
