"""``moshi-mlx serve``'s compute thread, ``ComputeWorker``: the one thread that touches MLX.
It loads the model, warms it up, then runs ``loop.drive`` for one conversation at a time."""

from __future__ import annotations

import argparse
import queue
import secrets
import threading
import time
from pathlib import Path

import numpy as np

from moshi_mlx.errors import MoshiError

from .audio import LagPolicy
from .loop import Prompt, Step
from .serve_session import Conversation, MicFrame, Settings


class ComputeWorker(threading.Thread):
    """The one thread that touches MLX: loads the model, warms it up, then runs each
    conversation handed to ``jobs`` (None stops it)."""

    def __init__(self, args: argparse.Namespace, sampling, max_waiting: int):
        super().__init__(name="moshi-compute", daemon=True)
        self.args, self.sampling, self.max_waiting = args, sampling, max_waiting
        self.jobs: queue.Queue[Conversation | None] = queue.Queue()
        self.ready = threading.Event()
        self.ended = threading.Event()
        self.error: BaseException | None = None
        self.driver = None
        self.messages: queue.Queue[str] = queue.Queue()

    def run(self) -> None:
        from moshi_mlx.engine import finish_thread

        from .options import load_model, prompt_from_args

        try:
            self.lm, self.mimi, self.tokenizer = load_model(self.args, report=self.messages.put)
            self.default_prompt = prompt_from_args(self.args, self.mimi, self.tokenizer,
                                                   report=self.messages.put)  # fmt: skip
            self._driver_for(self.sampling)
            self.messages.put(f"warm-up done ({self.args.engine} engine)")
            self.ready.set()
            while (conv := self.jobs.get()) is not None:
                self._converse(conv)
        except BaseException as e:  # handed to the main thread
            self.error = e
        finally:
            if self.driver is not None:
                self.driver.close()
            finish_thread()
            self.ended.set()

    def _driver_for(self, sampling):
        """A warm ``FrameDriver`` sampling as ``sampling`` asks (the seed aside, which is set
        per conversation): the current one, or a new one when the settings differ (their
        samplers are compiled into the generator)."""
        from .loop import FrameDriver

        key = sampling.replace(seed=None)
        if self.driver is None or self.driver_key != key:
            if self.driver is not None:
                self.driver.close()
                self.driver = None
            self.driver = FrameDriver(self.lm, self.mimi, self.tokenizer, sampling,
                                      engine=self.args.engine)  # fmt: skip
            self.driver_key = key
            self.driver.warmup()
        return self.driver

    def _prompt(self, settings: Settings) -> Prompt | None:
        from moshi_mlx import persona

        if settings.text_prompt is None and settings.voice is None:
            return self.default_prompt
        base = self.default_prompt or Prompt()
        voice, text = base.voice_codes, base.text_tokens
        if settings.voice is not None:
            voice = persona.load_voice_prompt(settings.voice, self.mimi)
        if settings.text_prompt is not None:
            text = persona.text_prompt_tokens(self.tokenizer, settings.text_prompt)
        return Prompt(None if voice is None else np.array(voice), text)

    def _converse(self, conv: Conversation) -> None:
        from .loop import drive

        recorder = dump = None
        try:
            try:
                sampling = conv.settings.sampling
                driver = self._driver_for(sampling)
                seed = sampling.seed if sampling.seed is not None else secrets.randbits(63)
                driver.engine.lm_call(lambda gen: setattr(gen, "seed", seed))
                driver.prompt = self._prompt(conv.settings)
                driver.reset()  # fresh caches, random state from the seed, persona prompt
                recorder = self._recorder(conv)
            except MoshiError as e:
                conv.resolve(conv.started, e)
                return
            conv.resolve(conv.started, None)
            dump = {k: [] for k in DUMP_KEYS} if self.args.debug_dump else None
            policy = LagPolicy(self.max_waiting)

            def source():
                while not conv.ended.is_set():
                    try:
                        frame = conv.mic.get(timeout=0.05)
                    except queue.Empty:
                        continue
                    waiting = conv.mic.qsize()
                    decision = policy.decide(waiting, conv.waiting_out(), -1, driver.in_flight)
                    if decision == LagPolicy.DROP_MIC:
                        conv.dropped_mic += 1
                        continue
                    yield frame

            def sink(frame: MicFrame, step: Step) -> None:
                conv.compute_s.append(step.compute_s)
                del conv.compute_s[:-50]
                conv.answer((frame, step))
                if recorder is not None:
                    recorder.block(frame.index, frame.pcm, step.pcm, 0.0)
                    if step.text:
                        recorder.text(frame.index, step.text)
                if dump is not None:
                    dump["frame_index"].append(frame.index)
                    dump["pcm_in"].append(frame.pcm)
                    dump["pcm_out"].append(step.pcm)
                    dump["user_codes"].append(step.user_codes)
                    dump["codes"].append(step.codes if step.codes is not None
                                         else np.full(self.lm.cfg.dep_q, -1))  # fmt: skip
                    dump["text"].append(-1 if step.text_id is None else step.text_id)

            drive(driver, source(), sink)
        except BaseException as e:
            self.error = e
            raise
        finally:
            conv.answer(None)
            if recorder is not None:
                try:
                    wav, txt = recorder.close()
                    self.messages.put(f"recorded conversation {conv.number}: {wav} ({txt})")
                except MoshiError as e:
                    self.messages.put(str(e))
            if dump is not None:
                self._write_dump(conv, dump)
            conv.resolve(conv.done, None)

    def _recorder(self, conv: Conversation):
        from .recording import Recorder

        if not self.args.record_dir:
            return None
        stamp = time.strftime("%Y%m%d-%H%M%S")
        folder = Path(self.args.record_dir)
        for n in range(1, 100):
            name = f"conversation-{stamp}" + ("" if n == 1 else f"-{n}")
            path = folder / f"{name}.wav"
            if not path.exists() and not (folder / f"{name}.transcript.txt").exists():
                return Recorder(path, settle=1)
        raise MoshiError(f"--record-dir {folder}: too many recordings named {stamp}")

    def _write_dump(self, conv: Conversation, dump: dict) -> None:
        from moshi_mlx.outputs import write_output

        arrays = {k: np.asarray(v) for k, v in dump.items()}
        arrays["dropped"] = np.asarray(conv.dropped())
        arrays["seed"] = np.asarray(self.driver.gen.seed, np.uint64)
        path = Path(self.args.debug_dump) / f"conversation-{conv.number}.npz"

        def write(tmp: Path) -> None:
            with open(tmp, "wb") as f:
                np.savez(f, **arrays)

        write_output(path, write, what="--debug-dump", suffix=".npz")


DUMP_KEYS = ("frame_index", "pcm_in", "pcm_out", "user_codes", "codes", "text")
