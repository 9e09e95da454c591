"""Where a conversion lands: a temporary folder beside the destination, moved into place at the
end without ever deleting what the user did not ask to replace.

Temporary folders are named ``.NAME.converting-PID-XXXXXXXX`` (and ``.NAME.old-PID-...`` for an
earlier conversion being replaced), so that the next conversion to the same destination can
tell those of a killed process from those of one still running, and remove them.
"""

from __future__ import annotations

import ctypes
import errno
import os
import shutil
from pathlib import Path

from moshi_mlx.errors import MoshiError
from moshi_mlx.leftovers import stale, temp_name
from moshi_mlx.loading import is_converted, read_json

KINDS = ("converting", "old")
MIMI_FILE = "mimi.safetensors"
INDEX_FILE = "model.safetensors.index.json"


def temp_folder(out: Path, kind: str) -> Path:
    """A fresh temporary folder beside ``out`` (with the usual permissions)."""
    tmp = temp_name(out, kind)
    tmp.mkdir()
    return tmp


def remove_stale(out: Path) -> list[Path]:
    """Remove the temporary folders that killed conversions to ``out`` left behind (those of
    a conversion still running stay). Returns what was removed."""
    removed = [path for path in stale(out, KINDS) if path.is_dir()]
    for path in removed:
        shutil.rmtree(path)
    return removed


def _unexpected(out: Path) -> list[str]:
    """Entries of ``out`` that are not those of the earlier conversion its config.json
    describes (all of them if it is not a conversion)."""
    config = read_json(out / "config.json", "config") if (out / "config.json").is_file() else {}
    entries = sorted(p.name for p in out.iterdir())
    if not is_converted(config) or not isinstance(config.get("files"), dict):
        return entries
    files = config["files"]
    lm = files.get("lm") if isinstance(files.get("lm"), list) else []
    ours = {"config.json", "README.md", INDEX_FILE, files.get("mimi"), files.get("tokenizer"), *lm}
    return [e for e in entries if e not in ours or not (out / e).is_file()]


def check_destination(out: Path, force: bool, inputs: list[Path]) -> None:
    """Refuse a destination holding anything but an earlier conversion (with ``force``) or
    nothing at all, and never one holding the inputs; and one that cannot be written."""
    if out.name in ("", ".", ".."):  # "" is "."; the folder we stand in cannot be replaced
        raise MoshiError(f"`mlx_path` {str(out)!r} names no new folder; give one, e.g. mlx_model")
    existing = next(p for p in out.absolute().parents if p.exists())
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise MoshiError(f"cannot write {out}: {existing} is not writable; pick another `mlx_path`")
    if not out.exists() and not out.is_symlink():
        return
    if out.is_symlink() or not out.is_dir():
        raise MoshiError(f"{out} exists and is not a folder; pick another `mlx_path`")
    resolved = out.resolve()
    for path in inputs:
        if path.resolve().is_relative_to(resolved):
            raise MoshiError(f"{out} holds the input file {path.name}; pick another `mlx_path`")
    if not force:
        raise MoshiError(f"{out} already exists; pass `force` to replace it")
    others = _unexpected(out)
    if others:
        shown = ", ".join(others[:3]) + (f" and {len(others) - 3} more" if len(others) > 3 else "")
        raise MoshiError(
            f"{out} is not only an earlier moshi-mlx conversion: `force` would delete {shown}; "
            "move them away or pick another `mlx_path`"
        )


def _renameat2(src: Path, dst: Path) -> int | None:
    """``rename`` that fails if ``dst`` exists (Linux ``renameat2(RENAME_NOREPLACE)``, macOS
    ``renamex_np(RENAME_EXCL)``); the errno, 0 on success, None where neither exists."""
    libc = ctypes.CDLL(None, use_errno=True)
    if hasattr(libc, "renameat2"):
        at_fdcwd, noreplace = -100, 1
        r = libc.renameat2(at_fdcwd, os.fsencode(src), at_fdcwd, os.fsencode(dst), noreplace)
    elif hasattr(libc, "renamex_np"):
        r = libc.renamex_np(os.fsencode(src), os.fsencode(dst), 0x4)  # RENAME_EXCL
    else:
        return None
    return ctypes.get_errno() if r else 0


def rename_no_replace(src: Path, dst: Path) -> None:
    """Move ``src`` to ``dst``; ``FileExistsError`` if something is at ``dst``, even if it
    appeared a moment ago."""
    err = _renameat2(src, dst)
    if err in (None, errno.EINVAL, errno.ENOSYS):  # no such call here, or not on this filesystem
        if dst.exists() or dst.is_symlink():
            err = errno.EEXIST
        else:
            os.rename(src, dst)
            return
    if err in (errno.EEXIST, errno.ENOTEMPTY):
        raise FileExistsError(errno.EEXIST, "exists", str(dst))
    if err:
        raise OSError(err, os.strerror(err), str(dst))


def move_into_place(tmp: Path, out: Path, force: bool, inputs: list[Path]) -> None:
    """Move the finished folder ``tmp`` to ``out``. What is at ``out`` now is checked again
    (it may have appeared, or changed, during the conversion); an earlier conversion is
    removed only once the new one is in place."""
    check_destination(out, force, inputs)
    old = None
    if out.exists():
        old = temp_folder(out, "old")
        old.rmdir()
        rename_no_replace(out, old)
    try:
        rename_no_replace(tmp, out)
    except FileExistsError:
        raise MoshiError(
            f"{out} appeared while converting; it was left untouched and this conversion "
            "discarded; pick another `mlx_path`, or pass `force` to replace an earlier conversion"
        ) from None
    except BaseException:
        if old is not None:
            rename_no_replace(old, out)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
