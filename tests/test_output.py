"""What ``run`` prints as it goes: its transcript as flowing text (wrapped in a terminal, a line
per turn in a pipe) and its progress in seconds of audio with the time left."""

from __future__ import annotations

import io

from moshi_mlx.app.display import TURN_PAUSE_S, Transcript
from moshi_mlx.app.loop import FRAME_S
from moshi_mlx.app.progress import Progress, seconds

# One frame's text each: words start with a space, a word may come in pieces, "" is padding.
TURN_1 = [" hello", "", " there", "", "", " how", " are", " you", " do", "ing", " to", "day"]
TURN_2 = [" i", " am", " fine", "", " thank", " you"]


def feed(transcript: Transcript, frames: list[str]) -> str:
    for text in frames:
        transcript.step(text)
    transcript.close()
    return transcript.out.getvalue()


def pause(frames: int) -> list[str]:
    return [""] * frames


def test_piped_each_turn_is_one_line():
    t = Transcript(io.StringIO())
    out = feed(t, TURN_1 + pause(t.pause_frames) + TURN_2 + pause(3))
    assert out == "hello there how are you doing today\ni am fine thank you\n"


def test_a_turn_ends_only_at_a_long_run_of_padding():
    t = Transcript(io.StringIO())
    assert t.pause_frames == round(TURN_PAUSE_S / FRAME_S) == 25
    out = feed(t, TURN_1 + pause(t.pause_frames - 1) + TURN_2)
    assert out == "hello there how are you doing today i am fine thank you\n"
    t = Transcript(io.StringIO())
    for text in TURN_1 + pause(t.pause_frames):
        t.step(text)
    assert t.out.getvalue() == "hello there how are you doing today\n"  # printed at the pause


def test_in_a_terminal_words_wrap_and_turns_are_paragraphs():
    t = Transcript(io.StringIO(), width=16)
    out = feed(t, TURN_1 + pause(t.pause_frames) + TURN_2)
    lines = out.splitlines()
    assert lines == ["hello there how", "are you doing", "today", "", "i am fine thank", "you"]
    assert all(len(line) <= 16 for line in lines)
    # Lines are printed as they fill, before the turn ends.
    t = Transcript(io.StringIO(), width=16)
    for text in TURN_1[:8]:  # up to " you": "are" does not fit after "how"
        t.step(text)
    assert t.out.getvalue() == "hello there how\n"


def test_a_word_longer_than_the_line_is_not_cut():
    t = Transcript(io.StringIO(), width=8)
    assert feed(t, [" a", " supercalifragilistic", " b"]).splitlines() == [
        "a", "supercalifragilistic", "b"
    ]  # fmt: skip


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_shows_seconds_of_audio_and_time_left(monkeypatch):
    monkeypatch.setattr("sys.stderr", FakeTerminal())
    with Progress() as progress:
        advance = progress.task("answering", seconds_per_step=FRAME_S)
        for frame in range(1, 51):
            advance(frame, 1000)  # 4 s of 80 s
        progress.bar.refresh()
        shown = progress.bar.console.file.getvalue()
    assert "answering" in shown and "4.0 s / 1:20" in shown and "left" in shown
    assert "50/1000" not in shown


def test_seconds_for_people():
    assert [seconds(s) for s in (0.08, 59.94, 60, 305.2)] == ["0.1 s", "59.9 s", "1:00", "5:05"]
