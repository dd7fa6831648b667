"""The table of passes: ``@register`` adds a pass class under its ``name``. The built-in passes
register when ``effc.passes`` is imported (``effc.pipeline`` does that); ``effc list-passes`` and
the pipeline text read the same table."""

from __future__ import annotations

PASSES: dict[str, type] = {}


def register(cls: type) -> type:
    """Class decorator: add a ``Pass`` subclass to the table under ``cls.name``."""
    if cls.name in PASSES:
        raise ValueError(f"pass name {cls.name!r} registered twice")
    PASSES[cls.name] = cls
    return cls
