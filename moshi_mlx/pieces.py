"""Evaluating a streaming step in pieces, for threads that compute at the same time.

MLX's scheduler lets all threads together keep about ten tasks (of ten dispatched operations
each) in flight, and a thread that evaluates one big graph (a whole LM step or Mimi frame, a
few thousand operations) fills those slots: a second thread evaluating beside it then waits
for a free slot every few operations, and both run far slower than alone. Inside
``in_pieces()``, the streaming code of the models evaluates at its layer boundaries
(``boundary``), so each thread holds only the layer it is computing and two threads run side
by side close to their speed alone. Results are unchanged: only when evaluation happens
changes.

The setting is per thread and off by default. It pays on MLX's CPU backend, where every ten
operations fill a task; on a GPU a task is a whole command buffer, and a host sync per layer
would cost more than it gains.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

import mlx.core as mx

_local = threading.local()


@contextmanager
def in_pieces(enabled: bool = True) -> Iterator[None]:
    """Within this block, on this thread, ``boundary`` evaluates (when ``enabled``)."""
    previous = getattr(_local, "enabled", False)
    _local.enabled = enabled
    try:
        yield
    finally:
        _local.enabled = previous


def evaluating_in_pieces() -> bool:
    """Whether this thread evaluates in pieces now (code that would otherwise trace a
    compiled function, where nothing can be evaluated, runs uncompiled then)."""
    return getattr(_local, "enabled", False)


def boundary(x: mx.array) -> mx.array:
    """A layer boundary of a streaming step: ``x`` is evaluated now inside ``in_pieces()``
    and left lazy otherwise. Returns ``x``."""
    if evaluating_in_pieces():
        mx.eval(x)
    return x
