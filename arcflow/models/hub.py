"""Where a model's weights come from: a local diffusers folder or a Hugging Face hub id.

A 12B teacher that cannot be fetched (offline, a gated licence not accepted, no token) would
otherwise surface as a diffusers traceback per rank, minutes into a job; it is checked once, up
front, with one line that says what to do.
"""

from __future__ import annotations

import functools
import os
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn, TypeVar

from huggingface_hub import constants, hf_hub_download
from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, OfflineModeIsEnabled, RepositoryNotFoundError

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
"""``owner/name``: what the hub accepts as a repository id (a local path has more or fewer parts)."""
T = TypeVar("T")


class ModelUnavailable(RuntimeError):
    """The configured model cannot be loaded; the message names the key and the value and says what to do."""


def is_local_path(pretrained: str | Path) -> bool:
    """A value that can only mean a folder on this machine: it exists, or it does not look like a hub id."""
    return Path(pretrained).exists() or not HUB_ID.match(str(pretrained))


def require_pretrained(pretrained: str | Path, key: str = "model.pretrained", subfolder: str | None = None) -> None:
    """Fail fast with :class:`ModelUnavailable` when ``pretrained`` is neither a local folder (with
    ``subfolder``'s config.json, if given) nor a hub repository this machine can read (fetching only its
    ``model_index.json``, which the hub cache keeps)."""
    if is_local_path(pretrained):
        if not Path(pretrained).is_dir():
            raise ModelUnavailable(f"{key}: local folder {pretrained} does not exist (expected a diffusers "
                                   "folder with model_index.json, or a hub id such as owner/name)")
        if subfolder and not (Path(pretrained) / subfolder / "config.json").is_file():
            raise ModelUnavailable(f"{key}: local folder {pretrained} has no {subfolder}/config.json (expected "
                                   f"the diffusers pipeline folder, whose {subfolder}/ holds the model)")
        return
    repo = str(pretrained)
    local = f"or point {key} at a local diffusers folder"
    try:
        hf_hub_download(repo, "model_index.json")
    except GatedRepoError:
        raise ModelUnavailable(f"{key}: {repo} is gated on the Hugging Face hub: accept its licence at "
                               f"https://huggingface.co/{repo} and log in (`hf auth login` or HF_TOKEN), "
                               f"{local}") from None
    except RepositoryNotFoundError:
        raise ModelUnavailable(f"{key}: {repo} is not on the Hugging Face hub, or is private and this machine "
                               f"is not logged in: check the id, log in (`hf auth login` or HF_TOKEN), "
                               f"{local}") from None
    except (OfflineModeIsEnabled, HfHubHTTPError, OSError) as err:
        offline = " (HF_HUB_OFFLINE is set)" if constants.HF_HUB_OFFLINE else ""
        raise ModelUnavailable(f"{key}: {repo} cannot be fetched from the Hugging Face hub{offline} and is not "
                               f"in the local cache {constants.HF_HUB_CACHE} ({type(err).__name__}): connect "
                               f"this machine and log in, {local}") from None


def report_once(err: Exception | str) -> NoReturn:
    """Print the message on the job's first rank only (every rank finds the same fault), then exit 1."""
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"arcflow: error: {err}", flush=True, file=sys.stderr)
    raise SystemExit(1)


def reports_unavailable_model(command: Callable[..., T]) -> Callable[..., T]:
    """Wrap a command so a :class:`ModelUnavailable` ends the job with its one line instead of a traceback."""

    @functools.wraps(command)
    def run(*args: object, **kwargs: object) -> T:
        try:
            return command(*args, **kwargs)
        except ModelUnavailable as err:
            report_once(err)

    return run
