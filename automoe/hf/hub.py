"""Hugging Face hub ids resolved offline: a local path, or a repository already in the local HF cache.

Nothing is downloaded at run time (training nodes are often offline, and a download in every rank is a race).
"""

from __future__ import annotations

import re
from pathlib import Path

_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def resolve_local(spec: str, *, key: str) -> Path:
    """`spec` as a local file or directory: the path itself when it exists, else the snapshot of hub id `spec`
    in the local HF cache. ValueError naming `key` when it is neither (with how to fetch it once)."""
    path = Path(spec).expanduser()
    if path.exists():
        return path
    if not _REPO_ID.match(spec) or spec.startswith((".", "/")):
        raise ValueError(f"{key}={spec!r} does not exist")
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.constants import HF_HUB_CACHE
    except ImportError:
        raise ValueError(
            f"{key}={spec!r} is not a local path, and huggingface_hub (to look it up in the HF cache) is not "
            "installed: pip install huggingface_hub, or pass a local directory"
        ) from None
    try:
        return Path(snapshot_download(spec, local_files_only=True))
    except Exception:  # noqa: BLE001 - not cached (LocalEntryNotFoundError) or not a valid id
        raise ValueError(
            f"{key}={spec!r} is not a local path and not in the local Hugging Face cache ({HF_HUB_CACHE}); "
            f"automoe never downloads at run time: fetch it once with `hf download {spec}` (or "
            "`huggingface-cli download`) on a machine with network access, then pass the id or the directory"
        ) from None
