"""Committed results: every benchmark and quality tool writes ``OUT.json`` and ``OUT.md``."""

from __future__ import annotations

import json
from pathlib import Path


def save(out: str | Path, data: dict, markdown: str, echo: bool = True) -> None:
    """Write the raw results and their markdown table next to each other (folders made)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_name(out.name + ".json").write_text(json.dumps(data, indent=1) + "\n")
    out.with_name(out.name + ".md").write_text(markdown + "\n")
    if echo:
        print(markdown)
