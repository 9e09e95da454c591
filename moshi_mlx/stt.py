"""Kyutai's streaming speech-to-text (STT 1B, STT 2.6B): word timestamps and a transcriber.

An STT model is Moshi's temporal transformer without a depth transformer: each 80 ms frame it
reads the speaker's 32 Mimi codebooks and writes one text token, ``audio_delay_seconds`` behind
the audio. Token 0 (the end of padding) opens a word, so the token stream gives each word's
time (``timestamped_words``, Kyutai's rule). ``Transcriber`` runs the model over the duplex
engine (``moshi_mlx.engine``: Mimi encodes a frame while the LM computes the previous one) and
turns its tokens into text as it arrives and words with their times; it feeds the silence
Kyutai's scripts put before the audio and, at the end, the audio delay's, so that the last
words come out.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from .errors import MoshiError
from .generate import LmGen
from .lm import Lm
from .mimi import Mimi
from .sampling import Sampling

FRAME_RATE = 12.5  # Mimi frames per second
FRAME = 1920  # samples of one frame at 24 kHz
END_OF_PADDING = 0  # the token that opens a word
PADDING = 3  # ids up to this one are never text (0, <s>, </s>, padding)
END_OF_TURN_HEAD = 2  # Kyutai reads this head's first class above 0.5 as "the speaker finished"


@dataclass(frozen=True)
class Word:
    text: str
    start: float  # seconds from the start of the audio
    end: float


def _seconds(position: float, offset_seconds: float) -> float:
    return max(0.0, position / FRAME_RATE - offset_seconds)


def _segment_words(
    tokens: list[tuple[int, int]], start: int, end: float, tokenizer, offset_seconds: float
) -> list[Word]:
    """The words of one segment: ``tokens`` (position, id) of the text ids in it, from frame
    ``start`` (the one after a 0) to ``end`` (the next 0, or the end of the last word)."""
    text = tokenizer.decode([t for position, t in tokens if position < end])
    words = text.split()
    found = []
    for word in words[:-1]:  # several words in one segment: one frame per token each
        n_tokens = len(tokenizer.encode(word))
        found.append(Word(word, _seconds(start, offset_seconds),
                          _seconds(start + n_tokens, offset_seconds)))  # fmt: skip
        start += n_tokens
    if words:
        found.append(
            Word(words[-1], _seconds(start, offset_seconds), _seconds(end, offset_seconds))
        )
    return found


class WordAligner:
    """Kyutai's timestamp rule, one token at a time: ``push(token)`` returns the words that
    token completes (a segment closes at the next 0), ``finish()`` those of the last segment,
    which ends at ``</s>`` or at most one second (12.5 frames) after its start. The words are
    exactly ``timestamped_words`` of the whole sequence; memory holds the open segment's text
    ids only."""

    def __init__(self, tokenizer, offset_seconds: float):
        self.tokenizer = tokenizer
        self.offset_seconds = offset_seconds
        self.eos = tokenizer.eos_id()
        self.position = 0
        self.start: int | None = None  # first frame of the open segment
        self.tokens: list[tuple[int, int]] = []  # (position, id) of its text ids
        self.eos_at: int | None = None  # first ``</s>`` in it

    def push(self, token: int) -> list[Word]:
        token, position = int(token), self.position
        self.position += 1
        if token == END_OF_PADDING:
            words = self._close(position) if self.start is not None else []
            self.start, self.tokens, self.eos_at = position + 1, [], None
            return words
        if self.start is not None:
            if token > PADDING:
                self.tokens.append((position, token))
            elif token == self.eos and self.eos_at is None:
                self.eos_at = position
        return []

    def finish(self) -> list[Word]:
        """The words of the last segment (call once, after the last token)."""
        if self.start is None:
            return []
        if self.eos_at is not None:
            end = self.eos_at
        else:
            end = min(self.position, self.start + FRAME_RATE)
        words = self._close(end)
        self.start = None
        return words

    def _close(self, end: float) -> list[Word]:
        return _segment_words(self.tokens, self.start, end, self.tokenizer, self.offset_seconds)


def timestamped_words(tokens, tokenizer, offset_seconds: float) -> list[Word]:
    """Words with their start and end (seconds) from an STT model's text tokens, one per
    frame, by Kyutai's rule: token 0 opens a word, which spans from the frame after it to the
    next 0; several words between two 0s get one frame per token each, the last the rest; the
    last word ends at ``</s>`` or at most 12.5 frames after its start. Time = frame / 12.5 -
    ``offset_seconds`` (the silence prefix and the audio delay), clamped at 0."""
    aligner = WordAligner(tokenizer, offset_seconds)
    words = [w for token in np.asarray(tokens).reshape(-1).tolist() for w in aligner.push(token)]
    return words + aligner.finish()


def text_of(tokens, tokenizer) -> str:
    """The transcript of a token sequence (its text ids decoded)."""
    return tokenizer.decode([int(t) for t in np.asarray(tokens).reshape(-1) if t > PADDING])


# ---- streaming ---------------------------------------------------------------------------------


@dataclass
class Update:
    """What one frame of the model's output brings, for each stream of the batch."""

    index: int  # the model's step (frames since the start, the silence prefix included)
    text: list[str]  # the text this step adds to each stream ("" while padding)
    words: list[list[Word]]  # words completed at this step
    end_of_turn: list[float] | None = None  # P(the speaker has finished), None without heads
    tokens: list[int] = field(default_factory=list)  # the text token of each stream


class Transcriber:
    """Streaming transcription of ``batch`` independent audio streams.

    ``push(pcm)`` takes one 80 ms frame (``[1920]`` float32 at 24 kHz, or ``[batch, 1920]``)
    and returns the ``Update`` s finished now (the pipelined engine answers a frame one push
    later); ``finish()`` feeds the audio delay's silence, closes the last words and returns
    the rest. Greedy decoding unless ``sampling`` says otherwise. ``Update.end_of_turn`` is
    head 2's probability on models with the voice-activity heads (> 0.5: the speaker has
    finished). Create, use and close it on one thread; ``close()`` (or ``with``) stops the
    engine.
    """

    def __init__(
        self,
        lm: Lm,
        mimi: Mimi,
        tokenizer,
        *,
        batch: int = 1,
        engine: str = "pipelined",
        sampling: Sampling | None = None,
    ):
        from .engine import make_engine

        if not lm.cfg.is_stt:
            raise MoshiError(
                "this is a Moshi dialogue model; transcription needs a speech-to-text model "
                "(Kyutai's STT, e.g. kyutai/stt-1b-en_fr-mlx)"
            )
        if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
            raise MoshiError(f"`batch` must be a positive integer, got {batch!r}")
        self.lm, self.tokenizer, self.batch = lm, tokenizer, batch
        cfg = lm.cfg
        self.prefix_frames = math.ceil(cfg.stt_prefix_seconds * FRAME_RATE)
        self.delay_frames = math.ceil(cfg.stt_delay_seconds * FRAME_RATE)
        self.offset_seconds = self.prefix_frames / FRAME_RATE + cfg.stt_delay_seconds
        self.has_heads = bool(cfg.extra_heads_num_heads > END_OF_TURN_HEAD)
        gen = LmGen(lm, sampling or Sampling(temp=0, temp_text=0))
        self.engine = make_engine(engine, lm, mimi, gen)
        self.reset()

    def reset(self) -> None:
        """Start new streams."""
        self.engine.reset()
        self.aligners = [
            WordAligner(self.tokenizer, self.offset_seconds) for _ in range(self.batch)
        ]
        self.tokens: list[list[int]] = [[] for _ in range(self.batch)]
        self.audio_frames = 0
        self._started = self._finished = False

    def _silence(self) -> np.ndarray:
        return np.zeros((self.batch, FRAME) if self.batch > 1 else FRAME, np.float32)

    def push(self, pcm: np.ndarray) -> list[Update]:
        """One frame of each stream's audio -> the updates finished now."""
        if self._finished:
            raise MoshiError("this transcription was finished; call reset() to start another")
        want = (self.batch, FRAME) if self.batch > 1 else (FRAME,)
        pcm = np.asarray(pcm)
        if pcm.dtype.kind != "f" or pcm.shape != want:
            raise MoshiError(
                f"`pcm` must be float audio shaped {list(want)} (80 ms at 24 kHz), got "
                f"{pcm.dtype} {list(pcm.shape)}"
            )
        updates = []
        if not self._started:
            self._started = True
            for _ in range(self.prefix_frames):
                updates += self._updates(self.engine.push(self._silence()))
        self.audio_frames += 1
        return updates + self._updates(self.engine.push(pcm.astype(np.float32, copy=False)))

    def finish(self) -> list[Update]:
        """Feed the audio delay's silence, wait for the last frames and close the last words
        (the final ``Update`` carries them)."""
        if self._finished:
            return []
        updates = []
        self._finished = True
        try:
            if self._started:
                for _ in range(self.delay_frames):
                    updates += self._updates(self.engine.push(self._silence()))
                updates += self._updates(self.engine.flush())
        except MoshiError:  # the engine stopped (a Ctrl-C inside a push): keep what came
            pass
        last = [aligner.finish() for aligner in self.aligners]
        if any(last):
            index = updates[-1].index + 1 if updates else 0
            updates.append(Update(index, [""] * self.batch, last))
        return updates

    def _updates(self, results) -> list[Update]:
        updates = []
        for r in results:
            ids = r.text_ids.tolist()
            words = []
            for row, token in enumerate(ids):
                self.tokens[row].append(token)
                words.append(self.aligners[row].push(token))
            text = [self._piece(t) for t in ids]
            end_of_turn = None
            if self.has_heads and r.extra_heads is not None:
                end_of_turn = r.extra_heads[:, END_OF_TURN_HEAD, 0].tolist()
            updates.append(Update(r.index, text, words, end_of_turn, ids))
        return updates

    def _piece(self, token: int) -> str:
        """What a streamed id adds to the text (the word-start marker as a space)."""
        if token <= PADDING or token >= self.tokenizer.get_piece_size():
            return ""
        return self.tokenizer.id_to_piece(token).replace("\u2581", " ")

    def text(self, row: int = 0) -> str:
        """The transcript of stream ``row`` so far."""
        return text_of(self.tokens[row], self.tokenizer)

    def seconds(self, index: int) -> float:
        """Where in the audio the model's step ``index`` is (its text lags by the delay)."""
        return _seconds(index, self.offset_seconds)

    def close(self) -> None:
        self.engine.close()

    def __enter__(self) -> Transcriber:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
