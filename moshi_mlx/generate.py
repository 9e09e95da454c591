"""Full-duplex streaming generation: one call per 80 ms frame, as upstream's ``LMGen.step``, with
optional teacher forcing of Moshi's own tokens, and NVIDIA PersonaPlex's system prompt."""

from __future__ import annotations

import secrets
import time
import warnings
from collections.abc import Sequence

import mlx.core as mx

from .errors import MoshiError, MoshiWarning
from .lm import Lm
from .pieces import boundary, evaluating_in_pieces
from .sampling import Sampling, token_sampler
from .validate import kind

# The two constant Mimi frames of PersonaPlex's system prompt (``SILENCE_TOKENS`` and
# ``SINE_TOKENS`` of NVIDIA's lm.py): Moshi's audio during the prompt's silences and text, and
# the user's audio during the whole prompt (named after the 440 Hz tone NVIDIA uses as the
# user's placeholder).
SILENCE_FRAME = (948, 243, 1178, 546, 1736, 1030, 1978, 2008)
SINE_FRAME = (430, 1268, 381, 1611, 1095, 1495, 56, 472)

# Prompt steps per batched temporal pass. Any size gives the same result through the rolling
# cache; this bounds the attention scores' memory ([heads, chunk, context + chunk]).
PREFILL_CHUNK = 256


class LmGen:
    """Streams Moshi: feed the user's codes of each frame, get Moshi's text and audio back.

    ``step(user_codes [B, n_q - dep_q])`` returns ``[B, 1 + dep_q]`` int32 (text token, then
    Moshi's audio codes of one frame, undelayed) or ``None`` while the delays fill (the first
    ``max_delay`` calls). User codes passed at step ``t`` are read at step ``t + delay`` (those
    of step 0 never reach the model), exactly as upstream's PyTorch ``LMGen``. Moshi's own
    audio and text can be given the same way (teacher forcing); what is not given is sampled.
    ``system_prompt`` runs PersonaPlex's voice and text prompt before the conversation.

    Sampling is a ``Sampling`` (or its fields as keywords: ``LmGen(lm, temp=0, seed=1)``); the
    generator owns its random state, so two generators never disturb each other and one with
    a seed replays exactly (``reset`` rewinds it). The temporal KV cache is a rolling window of
    ``context`` steps, so a conversation can go on forever in bounded memory. After each step,
    ``last_input``, ``last_text_logits`` and ``last_audio_logits`` hold the tokens the model
    read and the logits it sampled from, and ``last_extra_heads`` the extra heads'
    probabilities ``[B, heads, extra_heads_dim]`` (None for a model without them).

    A speech-to-text model (``dep_q`` 0, all delays 0) reads the user's ``n_q`` codebooks and
    returns ``[B, 1]``, its text token, from the first step.
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
        # forcing is data (a mask), so forced and free steps share it. Evaluated in pieces
        # (``moshi_mlx.pieces``) it runs uncompiled, with the same results.
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
        self.last_extra_heads: mx.array | None = None

    # -- input checks --------------------------------------------------------------------------

    def _check_codes(self, name: str, codes, shape: tuple, card: int, what: str) -> None:
        """``codes``: an mx.array of integers in ``[0, card)`` shaped like ``shape`` (an int:
        that size; a name: any size >= 1); else a MoshiError naming ``name``."""
        if not isinstance(codes, mx.array):
            raise MoshiError(f"{name} must be an mx.array, got {kind(codes)}")
        fits = codes.ndim == len(shape) and all(
            n >= 1 if isinstance(want, str) else n == want
            for n, want in zip(codes.shape, shape, strict=True)
        )
        if not fits:
            expected = ", ".join(map(str, shape))
            raise MoshiError(f"{name} must be [{expected}] ({what}), got shape {list(codes.shape)}")
        if not mx.issubdtype(codes.dtype, mx.integer):
            raise MoshiError(f"{name} must be integers, got {kind(codes)}")
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

        self.last_extra_heads = lm.extra_head_probs(z[:, -1])
        forced, mask = self._forced_next(batch)
        if cfg.dep_q == 0:  # speech-to-text: the text token is the whole frame
            produced = mx.where(mask[0], forced[:, 0], text)[:, None]
            self.last_audio_logits = []
        else:
            depformer = self.depformer_step if evaluating_in_pieces() else self._depformer
            produced, audio_logits = depformer(z, text, forced, mask, audio_key)
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
        mx.async_eval(out if self.last_extra_heads is None else (out, self.last_extra_heads))
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
            prev = boundary(mx.where(mask[k + 1], forced[:, k + 1], sampled))
            produced.append(prev)
        return mx.stack(produced, axis=1), mx.stack(logits, axis=1)

    # -- PersonaPlex's system prompt -----------------------------------------------------------

    def system_prompt(
        self,
        voice_codes: mx.array | None = None,
        text_tokens: Sequence[int] | mx.array | None = None,
        silence_frames: int = 6,
    ) -> None:
        """Teacher-force NVIDIA PersonaPlex's system prompt at the start of a conversation
        (after ``reset``, as NVIDIA does); the conversation then goes on with ``step``.

        The sequence is NVIDIA's: one frame per voice-prompt frame (Moshi's audio = the voice
        codes, its text = padding), ``silence_frames`` frames of Moshi silence, one frame per
        text-prompt token (Moshi silent, its text = the token), ``silence_frames`` more
        frames of silence; the user's audio is ``SINE_FRAME`` throughout.

        ``voice_codes``: Mimi codes ``[B, dep_q, F]`` of a recording of the voice
        (``persona.voice_prompt_from_pcm``); ``text_tokens``: token ids of the text prompt
        (``persona.text_prompt_tokens``), the same for the whole batch. The result is that of
        stepping the frames one by one (same KV cache, delay buffer, offset and random state:
        each frame consumes a step's randomness), but all frames except the last run as one
        batched pass of the temporal transformer, without the depth transformer, since every
        token it could sample is given. Warns (``MoshiWarning``) on a model not trained for
        prompts.
        """
        frames = self._prompt_frames(voice_codes, text_tokens, silence_frames)
        if not self.cfg.persona:
            warnings.warn(
                "this model was not trained for system prompts (it is not PersonaPlex); "
                "prompting it anyway",
                MoshiWarning,
                stacklevel=2,
            )
        if not frames:
            return
        self._prefill([self._given_streams(*frame, check=False) for frame in frames[:-1]])
        user, moshi, text = frames[-1]
        self.step(user, moshi_codes=moshi, text_token=text, check=False)

    def _prompt_frames(self, voice_codes, text_tokens, silence_frames: int) -> list[tuple]:
        """``(user_codes, moshi_codes, text_token)`` of every prompt frame, checked."""
        cfg = self.cfg
        if cfg.dep_q != len(SILENCE_FRAME) or cfg.n_user != len(SINE_FRAME):
            raise MoshiError(
                f"system prompts need {len(SILENCE_FRAME)} audio codebooks per stream "
                f"(PersonaPlex's layout); this model has {cfg.dep_q} + {cfg.n_user}"
            )
        if isinstance(silence_frames, bool) or not isinstance(silence_frames, int):
            raise MoshiError(f"silence_frames must be an integer, got {silence_frames!r}")
        if silence_frames < 0:
            raise MoshiError(f"silence_frames must be >= 0, got {silence_frames}")
        batch = self._batch or 1
        voice = []
        if voice_codes is not None:
            voice_codes = mx.array(voice_codes)
            self._check_codes(
                "voice_codes", voice_codes, ("batch", cfg.dep_q, "frames"), cfg.card, "Mimi codes"
            )
            self._check_batch("voice_codes", voice_codes.shape[0])
            batch = voice_codes.shape[0]
            voice = [voice_codes[:, :, f] for f in range(voice_codes.shape[2])]
        text = []
        text_tokens = mx.array([] if text_tokens is None else text_tokens)
        if text_tokens.size:  # an empty list is no text prompt
            self._check_codes(
                "text_tokens", text_tokens, ("tokens",), cfg.text_card, "text token ids"
            )
            text = [mx.full((batch,), token, mx.int32) for token in text_tokens.tolist()]
        user = mx.broadcast_to(mx.array(SINE_FRAME, mx.int32), (batch, cfg.n_user))
        silence = mx.broadcast_to(mx.array(SILENCE_FRAME, mx.int32), (batch, cfg.dep_q))
        pad = mx.full((batch,), cfg.existing_text_padding_id, mx.int32)
        spacer = [(user, silence, pad)] * silence_frames
        return (
            [(user, codes, pad) for codes in voice]
            + spacer
            + [(user, silence, token) for token in text]
            + spacer
        )

    def _prefill(self, frames: list[dict[int, mx.array]]) -> None:
        """Advance through ``frames`` (given tokens of each) as ``step`` would, running the
        temporal transformer once over all of them (in chunks of ``PREFILL_CHUNK``).

        Valid when each frame and the one after it give Moshi's text and audio: then nothing
        the depth transformer would sample survives, and it is skipped.
        """
        if not frames:
            return
        inputs = []
        for given in frames:
            self._write_given(given)
            inputs.append(self.model_input(self._batch))
            self.offset += 1
            self.key = mx.random.split(self.key, 3)[0]  # the randomness a step consumes
        x = mx.stack(inputs, axis=2)  # [B, n_q + 1, T]
        chunk = min(PREFILL_CHUNK, self.cfg.context)
        for start in range(0, x.shape[2], chunk):
            self.lm.temporal(self.lm.embed(x[:, :, start : start + chunk]), self.cache)
            mx.eval([c.keys for c in self.cache], [c.values for c in self.cache])
        mx.eval(self.key)
