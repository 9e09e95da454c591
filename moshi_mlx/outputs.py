"""The one rule for every file the program writes, and the writer that follows it.

The rule (``check_output``), checked before any slow work and again just before the file
appears:

- never onto an input: a path that is, or is a hard link to, one of ``inputs`` is refused,
  even with ``force``;
- never into a model folder: not inside one of ``models``, nor in a folder holding a model
  (a ``config.json`` beside ``*.safetensors`` weights), nor in the Hugging Face cache;
- never over an existing file without ``force``, never over anything but a regular file, and
  never through a symbolic link (dangling or not);
- named as what it is: with ``suffix`` (e.g. ``".wav"``), another suffix is refused with a line
  naming the right one;
- written to a temporary and renamed: ``Output`` writes under a marked, locked temporary
  beside the path (``moshi_mlx.leftovers``) and renames it into place at ``commit``, without
  replacing a file that appeared meanwhile unless ``force``; a writer killed on the way leaves
  a temporary that the next writer to the same path removes.

Every breach is a ``MoshiError`` of one line. Use it like this::

    out = Output(path, force=force, what="--output", inputs={"VOICE": voice}, suffix=".wav")
    ...                                   # slow work: the path was checked already
    with out.writing() as tmp:            # tmp: the temporary's path, removed on error
        write_the_file(tmp)
    # the file is at ``out.path`` now

``write_output(path, write, **rule)`` does the same in one call; ``append_output`` opens a log
that grows run after run. ``check_input(path, what)``
is the rule for what is read: a regular file, refused before it is opened otherwise (a FIFO
would block forever, ``/dev/zero`` never ends).
"""

from __future__ import annotations

import ctypes
import errno
import os
import stat
import warnings
from collections.abc import Callable, Iterable, Mapping
from contextlib import contextmanager
from pathlib import Path

from .errors import MoshiError, MoshiWarning
from .leftovers import Temporary, remove_stale

KINDS = ("writing", "converting")  # what ``Temporary`` is used for, cleaned by every writer


def hf_cache() -> Path:
    """The Hugging Face hub cache, as huggingface_hub finds it (without importing it)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or "~/.cache", "huggingface"
    )
    return Path(home).expanduser() / "hub"


def is_model_folder(folder: Path) -> bool:
    """A folder holding a model: a ``config.json`` beside safetensors weights."""
    try:
        return (folder / "config.json").is_file() and any(folder.glob("*.safetensors"))
    except OSError:
        return False


def describe(mode: int) -> str:
    """What a file of ``mode`` is, in words."""
    kinds = {stat.S_ISDIR: "a folder", stat.S_ISFIFO: "a FIFO (named pipe)",
             stat.S_ISCHR: "a character device", stat.S_ISBLK: "a block device",
             stat.S_ISSOCK: "a socket", stat.S_ISLNK: "a symbolic link"}  # fmt: skip
    for test, words in kinds.items():
        if test(mode):
            return words
    return "not a regular file"


def check_input(path: str | Path, what: str = "the input") -> Path:
    """``path`` if it is a regular file (links followed); one line naming what it is
    otherwise, without opening it."""
    path = Path(path)
    try:
        st = path.stat()
    except FileNotFoundError:
        raise MoshiError(f"{what}: no such file: {path}") from None
    except OSError as e:
        raise MoshiError(f"{what}: cannot read {path}: {e.strerror or e}") from None
    if not stat.S_ISREG(st.st_mode):
        raise MoshiError(f"{what}: {path} is {describe(st.st_mode)}; give a file")
    return path


def open_input(path: str | Path, what: str = "the input"):
    """``check_input``, then the file opened for reading (binary); the open never blocks (a
    FIFO put there meanwhile is refused too)."""
    path = check_input(path, what)
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except OSError as e:
        raise MoshiError(f"{what}: cannot read {path}: {e.strerror or e}") from None
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        raise MoshiError(f"{what}: {path} is {describe(mode)}; give a file")
    if hasattr(os, "set_blocking"):
        os.set_blocking(fd, True)
    return os.fdopen(fd, "rb")


def check_output(
    path: str | Path,
    *,
    force: bool = False,
    what: str = "the output",
    inputs: Mapping[str, str | Path] | None = None,
    models: Iterable[str | Path | None] = (),
    suffix: str | None = None,
    kind: str | None = None,
) -> Path:
    """``path`` if a new file may be written there under the rule (module docstring); one
    line naming the problem otherwise. ``inputs``: what the command reads, by the name the
    message gives it (``{"IN": "talk.wav"}``); ``models``: the model folders in use;
    ``suffix``/``kind``: the suffix the file must have and what the file is, in words."""
    path = Path(path)
    folder = path.parent
    if len(os.fsencode(path.name)) > 255 or len(os.fsencode(str(path.absolute()))) >= 4096:
        raise MoshiError(f"the path {str(path)[:40]}... is too long for this file system")
    if not folder.is_dir():
        raise MoshiError(f"the folder of {path} ({folder}) does not exist")
    if len(os.fsencode(path.name)) > os.pathconf(folder, "PC_NAME_MAX"):
        raise MoshiError(f"the file name {path.name[:40]}... is too long for this file system")
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        st = None
    for label, source in (inputs or {}).items():
        if source is not None and _same(path, st, Path(source)):
            raise MoshiError(f"{what} would overwrite {label} ({source}); write it elsewhere")
    where = folder.resolve()
    for model in [*models, hf_cache()]:
        if model is not None and Path(model).is_dir():
            if where.is_relative_to(Path(model).resolve()):
                raise MoshiError(
                    f"{what} {path} is inside the model folder {model}; write elsewhere"
                )
    if is_model_folder(where):
        raise MoshiError(f"{what} {path} is inside a model folder ({where}); write elsewhere")
    if st is not None:
        if stat.S_ISLNK(st.st_mode):
            raise MoshiError(f"{path} is a symbolic link; refusing to write through it")
        if not stat.S_ISREG(st.st_mode):
            raise MoshiError(f"{path} exists and is not a regular file; pick another name")
        if not force:
            raise MoshiError(f"{path} exists; pick another name, or pass --force to overwrite it")
    if suffix is not None and path.suffix.lower() != suffix:
        right = path.with_suffix(suffix).name if path.suffix else path.name + suffix
        raise MoshiError(
            f"{what} {path.name}: {kind or 'the file'} is a {suffix} file; name it {right}"
        )
    if not os.access(folder, os.W_OK | os.X_OK):
        raise MoshiError(f"cannot write to the folder {folder}")
    try:  # what access() cannot tell (/proc, a file system out of inodes): try it
        Temporary(path, "writing").close()
    except OSError as e:
        raise MoshiError(f"cannot create {path}: {e.strerror or e}") from None
    return path


def _same(path: Path, st: os.stat_result | None, source: Path) -> bool:
    try:
        if st is not None and not stat.S_ISLNK(st.st_mode):
            theirs = source.stat()
            return (st.st_dev, st.st_ino) == (theirs.st_dev, theirs.st_ino)
        return path.resolve() == source.resolve()
    except OSError:
        return False


class Output:
    """A file to write under the rule: checked now (``check_output``'s arguments), written
    with ``writing()`` and in place once that ends."""

    def __init__(self, path: str | Path, *, force: bool = False, **rule):
        self.rule = dict(force=force, **rule)
        self.path = check_output(path, **self.rule)
        self.force = force
        self._temp: Temporary | None = None

    def start(self) -> Path:
        """Begin writing: the temporary's path (a new, empty name), after removing the
        temporaries killed writers left for this path."""
        for stale in remove_stale(self.path, KINDS):
            warnings.warn(
                f"removed {stale}, left behind by a moshi-mlx writer that was killed",
                MoshiWarning,
                stacklevel=3,
            )
        self._temp = Temporary(self.path, "writing")
        return self._temp.payload

    def commit(self) -> Path:
        """Move the finished temporary to ``path`` (the rule checked again: things change
        while we compute); the temporary is gone either way."""
        try:
            check_output(self.path, **self.rule)
            if self.force:
                os.replace(self._temp.payload, self.path)
            else:
                try:
                    rename_no_replace(self._temp.payload, self.path)
                except FileExistsError:
                    raise MoshiError(
                        f"{self.path} appeared meanwhile; it was left untouched"
                    ) from None
        finally:
            self.discard()
        return self.path

    def discard(self) -> None:
        """Remove the temporary (and what was written to it). Idempotent."""
        if self._temp is not None:
            self._temp.close()
            self._temp = None

    @contextmanager
    def writing(self):
        """``start``, then ``commit`` when the block ends, or ``discard`` if it raises; an
        ``OSError`` while writing (a full disk) becomes one line."""
        tmp = self.start()
        try:
            yield tmp
        except OSError as e:
            self.discard()
            raise MoshiError(f"cannot write {self.path}: {e.strerror or e}") from None
        except BaseException:
            self.discard()
            raise
        self.commit()


def write_output(path: str | Path, write: Callable[[Path], None], **rule) -> Path:
    """Check ``path`` under the rule, call ``write(temporary_path)``, rename it into place."""
    out = Output(path, **rule)
    with out.writing() as tmp:
        write(tmp)
    return out.path


def create_in_place(path: str | Path, **rule):
    """A new file opened for writing (binary) at ``path`` itself, for what must survive its
    writer being killed (a recording): the rule checked, the open never follows a link, nor
    replaces a file that appeared meanwhile unless ``force``."""
    path = check_output(path, **rule)
    flags = os.O_WRONLY | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0)
    try:
        fd = os.open(path, flags | (os.O_TRUNC if rule.get("force") else os.O_EXCL), 0o666)
    except FileExistsError:
        raise MoshiError(
            f"{path} exists; pick another name, or pass --force to overwrite it"
        ) from None
    except OSError as e:
        raise MoshiError(f"cannot create {path}: {e.strerror or e}") from None
    return os.fdopen(fd, "wb")


def append_output(path: str | Path, check_only: bool = False, **rule):
    """A log that grows run after run (one JSON line each, e.g. ``bench --json-out``), opened
    for appending (text): the rule as for a new file, except that an existing regular file is
    appended to, never replaced; never through a link (the open itself refuses one).
    ``check_only``: check, open nothing (before the slow work)."""
    path = Path(path)
    st = None
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        pass
    if st is not None and not stat.S_ISLNK(st.st_mode) and stat.S_ISREG(st.st_mode):
        rule = {**rule, "force": True}  # appending is not overwriting
    path = check_output(path, **rule)
    if check_only:
        return None
    flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0)
    try:
        fd = os.open(path, flags | getattr(os, "O_NONBLOCK", 0), 0o666)
    except OSError as e:
        raise MoshiError(f"cannot write {path}: {e.strerror or e}") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise MoshiError(f"{path} exists and is not a regular file; pick another name")
    return os.fdopen(fd, "a")


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
        if src.is_file() and not src.is_symlink():
            try:  # a hard link never replaces anything
                os.link(src, dst)
                os.unlink(src)
                return
            except FileExistsError:
                err = errno.EEXIST
            except OSError:
                pass
        if err != errno.EEXIST:
            if dst.exists() or dst.is_symlink():
                err = errno.EEXIST
            else:
                os.rename(src, dst)
                return
    if err in (errno.EEXIST, errno.ENOTEMPTY):
        raise FileExistsError(errno.EEXIST, "exists", str(dst))
    if err:
        raise OSError(err, os.strerror(err), str(dst))
