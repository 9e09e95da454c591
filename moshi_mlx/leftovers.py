"""Temporaries that prove they are ours: written beside their destination, renamed into place
at the end, and removed after a killed writer only when that is certain.

A writer makes a hidden folder ``.NAME.KIND-XXXXXXXXXXXXXXXX`` beside the destination ``NAME``
holding two things: the mark, a file ``.moshi-mlx-temporary`` that the writer keeps locked
(``fcntl.flock``) for as long as it lives and that lists every name it creates before creating
it, and the work itself, ``payload`` (a file, or a folder of files). A lock dies with its
process, whatever PID namespace or machine the process is in, so an unlocked mark means the
writer is gone (killed, crashed); a mark is written only once locked, so an empty or unreadable
one is never taken for ours.

``remove_stale(dest, kinds)`` removes a temporary only when everything holds: its name is
exactly one this module makes; it is a real folder (never a link, never a mount point, on the
same file system as its parent); its mark is a regular file starting with our header, locked
by nobody; and it holds nothing but the mark and the names the mark lists, as regular files
(one level of folder for ``payload``). Anything else, a user's file or folder named like a
temporary included, is left alone, as is anything that cannot be read or parsed.
"""

from __future__ import annotations

import fcntl
import os
import re
import secrets
import stat
from pathlib import Path

MARK = ".moshi-mlx-temporary"
HEADER = b"moshi-mlx temporary v1\n"
PAYLOAD = "payload"
_MAX_MARK = 1 << 16  # bytes of a mark we read: a few hundred names at most
_TOKEN = 16  # hex digits in a temporary's name


class Temporary:
    """A marked, locked temporary folder beside ``dest`` (see the module docstring).

    ``payload`` is the path to write (a file, or a folder with ``folder=True``, created
    empty); a name inside a payload folder is recorded with ``add(name)`` before it is
    created. ``move_to(dest)`` renames the payload into place; ``close()`` removes what is
    left (a discarded payload included) and releases the lock. The lock is held from the
    moment the mark has content until ``close``."""

    def __init__(self, dest: Path, kind: str, folder: bool = False):
        dest = Path(dest)
        self.path = dest.with_name(f".{dest.name}.{kind}-{secrets.token_hex(_TOKEN // 2)}")
        self.payload = self.path / PAYLOAD
        self._fd: int | None = None
        self._names = [PAYLOAD + ("/" if folder else "")]
        try:  # from the mkdir on: a signal between two steps still leaves nothing
            os.mkdir(self.path)
            fd = os.open(self.path / MARK, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW)
            self._fd = fd
            fcntl.flock(fd, fcntl.LOCK_EX)
            _write_all(fd, HEADER + self._names[0].encode() + b"\n")
            if folder:
                os.mkdir(self.payload)
        except BaseException:
            self.close()
            raise

    def add(self, name: str) -> Path:
        """Record ``name`` (a plain file name) as made inside the payload folder; its path."""
        if not plain_name(name) or name == MARK:
            raise ValueError(f"not a plain file name: {name!r}")
        if name not in self._names:
            _write_all(self._fd, f"{PAYLOAD}/{name}\n".encode())
            self._names.append(name)
        return self.payload / name

    def close(self) -> None:
        """Remove everything this temporary made (what is still in it), then the folder, and
        release the lock. Idempotent; errors are ignored (at worst a marked temporary is left,
        which the next writer to the destination removes)."""
        if self._fd is None and not self.path.exists():
            return
        try:
            if self._names[0].endswith("/"):  # only the names it made, even in its own folder
                for name in self._names[1:]:
                    (self.payload / name).unlink(missing_ok=True)
                if self.payload.is_dir() and not self.payload.is_symlink():
                    self.payload.rmdir()
            else:
                self.payload.unlink(missing_ok=True)
            (self.path / MARK).unlink(missing_ok=True)
            self.path.rmdir()
        except OSError:
            pass
        finally:
            if self._fd is not None:
                os.close(self._fd)  # the lock goes with it
                self._fd = None

    def __enter__(self) -> Temporary:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _write_all(fd: int, data: bytes) -> None:
    while data:
        data = data[os.write(fd, data) :]


def plain_name(name: str) -> bool:
    """A name a temporary may record: one path component, no line break."""
    return bool(name) and name not in (".", "..") and not any(c in name for c in "/\0\n")


def pattern(dest: Path, kinds: tuple[str, ...]) -> re.Pattern:
    """The names ``Temporary(dest, kind)`` gives, for any of ``kinds``."""
    alternatives = "|".join(re.escape(k) for k in kinds)
    return re.compile(rf"\.{re.escape(dest.name)}\.(?:{alternatives})-[0-9a-f]{{{_TOKEN}}}")


def destination_name(name: str) -> str | None:
    """The name of the destination a temporary called ``name`` is written for, or None when
    ``name`` is not a temporary's (error messages name what the user named)."""
    m = re.fullmatch(rf"\.(.+)\.[a-z]+-[0-9a-f]{{{_TOKEN}}}", name)
    return m[1] if m else None


def remove_stale(dest: Path, kinds: tuple[str, ...]) -> list[Path]:
    """Remove the temporaries of ``dest`` whose writers are gone and that provably are ours
    (see the module docstring); returns what was removed. Never raises for what it finds."""
    dest = Path(dest)
    folder = dest.parent
    names = pattern(dest, kinds)
    removed = []
    try:
        parent = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return removed
    try:
        for name in os.listdir(parent):
            if names.fullmatch(name):
                try:
                    if _remove_if_ours(parent, name):
                        removed.append(folder / name)
                except (OSError, ValueError):  # anything odd: leave it alone
                    pass
    finally:
        os.close(parent)
    return removed


def _open_folder(at: int, name: str, device: int) -> int | None:
    """A folder ``name`` in folder ``at`` opened without following a link, on file system
    ``device`` and not a mount point; None otherwise."""
    st = os.stat(name, dir_fd=at, follow_symlinks=False)
    if not stat.S_ISDIR(st.st_mode) or st.st_dev != device:
        return None
    fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=at)
    opened = os.fstat(fd)
    if (opened.st_dev, opened.st_ino) != (st.st_dev, st.st_ino) or _mount_point(fd):
        os.close(fd)
        return None
    return fd


def _mount_point(fd: int) -> bool:
    """Whether the folder open as ``fd`` is where a file system is mounted (a bind mount of
    the same file system included, where the kernel says so)."""
    if not os.path.exists("/proc/self/mountinfo"):  # macOS: st_dev tells a mount point
        return False
    try:
        target = os.fsencode(os.readlink(f"/proc/self/fd/{fd}"))
        with open("/proc/self/mountinfo", "rb") as f:
            points = [line.split(b" ")[4] for line in f]
    except (OSError, IndexError):
        return True  # cannot tell: treat it as one
    unescape = re.compile(rb"\\([0-7]{3})")
    return any(unescape.sub(lambda m: bytes([int(m[1], 8)]), p) == target for p in points)


def _remove_if_ours(parent: int, name: str) -> bool:
    device = os.fstat(parent).st_dev
    top = _open_folder(parent, name, device)
    if top is None:
        return False
    mark = sub = None
    try:
        mark = os.open(MARK, os.O_RDWR | os.O_NOFOLLOW, dir_fd=top)
        if not stat.S_ISREG(os.fstat(mark).st_mode):
            return False
        try:
            fcntl.flock(mark, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:  # its writer is alive
            return False
        listed = _listed(os.pread(mark, _MAX_MARK + 1, 0))
        if listed is None:
            return False
        files, folders = listed
        entries = set(os.listdir(top)) - {MARK}
        if not entries <= ({n for n in files if "/" not in n} | set(folders)):
            return False
        plan: list[tuple[int, str]] = []  # (folder fd, file name) to unlink
        for entry in sorted(entries):
            st = os.stat(entry, dir_fd=top, follow_symlinks=False)
            if entry in folders:
                sub = _open_folder(top, entry, device)
                if sub is None:
                    return False
                inside = os.listdir(sub)
                if not set(inside) <= {n.split("/", 1)[1] for n in files if "/" in n}:
                    return False
                for file in inside:
                    if not stat.S_ISREG(os.stat(file, dir_fd=sub, follow_symlinks=False).st_mode):
                        return False
                    plan.append((sub, file))
            elif not stat.S_ISREG(st.st_mode):
                return False
            else:
                plan.append((top, entry))
        for at, file in plan:
            os.unlink(file, dir_fd=at)
        for folder in folders:
            if folder in entries:
                os.rmdir(folder, dir_fd=top)
        os.unlink(MARK, dir_fd=top)
        os.rmdir(name, dir_fd=parent)
        return True
    finally:
        for fd in (sub, mark, top):
            if fd is not None:
                os.close(fd)


def _listed(text: bytes) -> tuple[set[str], set[str]] | None:
    """``(files, folders)`` a mark lists, None unless it is one of ours."""
    if len(text) > _MAX_MARK or not text.startswith(HEADER) or not text.endswith(b"\n"):
        return None
    try:
        lines = text[len(HEADER) :].decode().splitlines()
    except UnicodeDecodeError:
        return None
    files, folders = set(), set()
    for line in lines:
        if line == PAYLOAD + "/":
            folders.add(PAYLOAD)
        elif line == PAYLOAD or (line.startswith(PAYLOAD + "/") and plain_name(line[8:])):
            files.add(line)
        else:
            return None
    return files, folders
