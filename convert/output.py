"""Where a conversion lands: a temporary folder beside the destination, moved into place at the
end without ever deleting what the user did not ask to replace.

The temporary folder is a ``moshi_mlx.leftovers.Temporary`` (``.NAME.converting-...``): locked
while its conversion runs and listing every file it writes, so that the next conversion to the
same destination removes it only if its writer is gone and it holds nothing else. An earlier
conversion being replaced is moved into such a folder of its own before it is removed.
"""

from __future__ import annotations

import os
from pathlib import Path

from moshi_mlx import leftovers
from moshi_mlx.errors import MoshiError
from moshi_mlx.leftovers import Temporary
from moshi_mlx.loading import is_converted, read_json
from moshi_mlx.outputs import hf_cache, is_model_folder, rename_no_replace

KIND = "converting"
MIMI_FILE = "mimi.safetensors"
INDEX_FILE = "model.safetensors.index.json"
OWN_FILES = ("config.json", "README.md", INDEX_FILE, MIMI_FILE)  # beside the LM's shards


def temp_folder(out: Path) -> Temporary:
    """A fresh temporary folder beside ``out``; its files are made at ``tmp.add(name)``."""
    return Temporary(out, KIND, folder=True)


def remove_stale(out: Path) -> list[Path]:
    """Remove the temporary folders that killed conversions to ``out`` left behind (never one
    whose conversion still runs, nor anything not provably ours). Returns what was removed."""
    return leftovers.remove_stale(out, (KIND,))


def check_names(lm_files: list[str], tokenizer: Path) -> None:
    """Refuse a tokenizer whose file name is one the converted folder gives its own files (it
    would overwrite them)."""
    if tokenizer.name in (*OWN_FILES, *lm_files) or not leftovers.plain_name(tokenizer.name):
        raise MoshiError(
            f"the tokenizer's file name {tokenizer.name!r} is one the converted folder uses for "
            "its own files; copy it under another name (e.g. tokenizer.model) and give that "
            "with `tokenizer`"
        )


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
    models = [p.parent for p in inputs if is_model_folder(p.parent)]
    for folder in (*models, hf_cache()):
        inside = out.absolute().resolve().parents  # (out itself: "holds the input" below)
        if folder.is_dir() and folder.resolve() in inside:
            raise MoshiError(f"{out} is inside the model folder {folder}; pick another `mlx_path`")
    existing = next(p for p in out.absolute().parents if p.exists())
    if is_model_folder(existing):
        raise MoshiError(f"{out} is inside a model folder ({existing}); pick another `mlx_path`")
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


def move_into_place(tmp: Temporary, out: Path, force: bool, inputs: list[Path]) -> None:
    """Move the finished folder ``tmp.payload`` to ``out``. What is at ``out`` now is checked
    again (it may have appeared, or changed, during the conversion); an earlier conversion is
    moved into a temporary of its own and removed only once the new one is in place."""
    check_destination(out, force, inputs)
    old = None
    try:
        if out.exists():
            old = temp_folder(out)
            for name in os.listdir(out):  # all ours: check_destination made sure
                old.add(name)
            old.payload.rmdir()
            rename_no_replace(out, old.payload)
        try:
            rename_no_replace(tmp.payload, out)
        except FileExistsError:
            raise MoshiError(
                f"{out} appeared while converting; it was left untouched and this conversion "
                "discarded; pick another `mlx_path`, or pass `force` to replace an earlier "
                "conversion"
            ) from None
        except BaseException:
            if old is not None:
                rename_no_replace(old.payload, out)
            raise
    finally:
        if old is not None:
            old.close()
