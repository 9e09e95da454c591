"""Stopping signals: SIGTERM (``kill``, a service manager) and SIGHUP (the terminal closed) stop
a command as Ctrl-C does, so that what it was writing is finished or removed, never left half
done; and once a command is finishing up, further signals wait."""

from __future__ import annotations

import signal

STOPPING = tuple(
    getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name)
)


def stop_as_interrupt() -> None:
    """Make SIGTERM and SIGHUP raise ``KeyboardInterrupt`` like Ctrl-C (main thread only)."""
    for s in STOPPING:
        if signal.getsignal(s) is not signal.SIG_IGN:  # `nohup` keeps SIGHUP ignored
            signal.signal(s, signal.default_int_handler)


def hold_stops() -> None:
    """Ignore the stopping signals from now on: what is left takes milliseconds and must not
    be lost to a second Ctrl-C."""
    for s in STOPPING:
        signal.signal(s, signal.SIG_IGN)
