"""Names for what is written beside its destination and renamed into place at the end.

A temporary name carries its writer's PID (``.NAME.KIND-PID-XXXXXXXX``), so that the next
writer to the same destination can tell what a killed process left behind from what one still
running is writing, and remove only the former.
"""

from __future__ import annotations

import glob
import os
import re
import secrets
from pathlib import Path


def temp_name(path: Path, kind: str) -> Path:
    """A fresh hidden name in ``path``'s folder (same file system: the final rename is
    atomic)."""
    return path.with_name(f".{path.name}.{kind}-{os.getpid()}-{secrets.token_hex(4)}")


def stale(path: Path, kinds: tuple[str, ...]) -> list[Path]:
    """The ``temp_name(path, kind)`` entries whose writer is gone (symbolic links never)."""
    pattern = re.compile(rf"\.{re.escape(path.name)}\.(?:{'|'.join(kinds)})-(\d+)-[0-9a-f]{{8}}")
    found = []
    for entry in path.parent.glob(f".{glob.escape(path.name)}.*"):
        m = pattern.fullmatch(entry.name)
        if m and not entry.is_symlink() and not _alive(int(m[1])):
            found.append(entry)
    return found


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True
