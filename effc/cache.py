"""The user cache folder (``~/.cache/effc``, or ``$EFFC_CACHE``): converted models, compiled
kernels. Nothing in effc depends on a cache existing; everything in it can be rebuilt."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    root = Path(os.environ.get("EFFC_CACHE", Path.home() / ".cache" / "effc"))
    root.mkdir(parents=True, exist_ok=True)
    return root
