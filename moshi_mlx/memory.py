"""Memory figures of this process."""

from __future__ import annotations

import resource
import sys


def max_rss_bytes() -> int:
    """Peak resident memory of this process so far (``ru_maxrss``: bytes on macOS, KiB on
    Linux)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024
