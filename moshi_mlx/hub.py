"""Hugging Face Hub access: turn a repo id into a local folder of model files.

Only ``moshi_mlx.load`` and the converter call this, and only for names that are not local
paths. Downloads go to the usual Hugging Face cache with its progress bars; with
``HF_HUB_OFFLINE=1`` (or no network) the cache is used as is.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from .errors import MoshiError

# ``owner/name``: what the Hub accepts as a model repo id (no leading ./, / or ~).
_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


class HubError(MoshiError):
    """A repo id that cannot be turned into a local folder; the message is one line."""


def is_repo_id(name: str | Path) -> bool:
    """True when ``name`` is not an existing path and is spelled like ``owner/repo``."""
    name = str(name)
    return not Path(name).expanduser().exists() and _REPO_ID.fullmatch(name) is not None


def repo_id_problem(repo_id: str) -> str | None:
    """Why the Hub would refuse ``repo_id`` (``owner/..``, ``owner/name.git``...), in
    huggingface_hub's own words; None when it is valid."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as e:
        return " ".join(str(e).split()).rstrip(".")
    return None


def offline() -> bool:
    """``HF_HUB_OFFLINE`` as set now (huggingface_hub itself reads it once, at import)."""
    from huggingface_hub import constants

    value = os.environ.get("HF_HUB_OFFLINE", "")
    return value.upper() in ("1", "ON", "YES", "TRUE") or bool(constants.HF_HUB_OFFLINE)


def snapshot(repo_id: str, allow_patterns: list[str], revision: str | None = None) -> Path:
    """Download (or find in the cache) the files of ``repo_id`` matching ``allow_patterns``.

    Raises ``HubError`` with one line naming the repo and how to use a local folder instead.
    """
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    instead = "or pass a local folder holding the model files instead"
    try:
        return Path(
            snapshot_download(
                repo_id,
                revision=revision,
                allow_patterns=allow_patterns,
                local_files_only=offline(),
            )
        )
    except GatedRepoError:
        raise HubError(
            f"{repo_id} is gated on the Hugging Face Hub: accept its terms on the website and log "
            f"in (`hf auth login`), {instead}"
        ) from None
    except RepositoryNotFoundError:
        raise HubError(
            f"{repo_id} was not found on the Hugging Face Hub (misspelled, private, or meant as a "
            f"local folder that does not exist?); check the name, {instead}"
        ) from None
    except RevisionNotFoundError:
        raise HubError(f"{repo_id} has no revision {revision!r}") from None
    except LocalEntryNotFoundError:
        if offline():
            raise HubError(
                f"{repo_id} is not in the Hugging Face cache and downloads are off "
                f"(HF_HUB_OFFLINE=1); download it once online, {instead}"
            ) from None
        raise HubError(
            f"cannot reach the Hugging Face Hub to download {repo_id} and it is not cached; "
            f"check the network, {instead}"
        ) from None
    except OSError as e:  # other HTTP errors, incomplete cached snapshots, disk problems
        detail = " ".join(str(e).split())
        raise HubError(f"cannot get {repo_id} from the Hugging Face Hub: {detail}") from None


def local_folder(path_or_repo_id: str | Path) -> Path | None:
    """The folder for a local path, None for a repo id; a missing local path is an error."""
    path = Path(path_or_repo_id).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise HubError(f"{path} is a file; expected a model folder or a Hugging Face repo id")
    if is_repo_id(path_or_repo_id):
        problem = repo_id_problem(str(path_or_repo_id))
        if problem is None:
            return None
        raise HubError(
            f"no such folder: {path}; nor is it a valid Hugging Face repo id ({problem}); "
            "check the name"
        )
    raise HubError(f"no such folder: {path} (and it is not a Hugging Face repo id owner/name)")
