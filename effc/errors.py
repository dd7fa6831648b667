"""Errors a user can act on. The CLI prints ``str(err)`` on one line and exits with code 2."""

from __future__ import annotations

import difflib


class EffcError(Exception):
    """Base class of every error effc raises on purpose."""


class InputError(EffcError):
    """A model, data or artifact file is missing, corrupt or unsafe."""


class UnsupportedError(EffcError):
    """The model uses something effc cannot handle (an op, an IR kind, a missing extra)."""


class PassOptionError(EffcError):
    """A pass name or option is wrong."""


class PassFailedError(EffcError):
    """A pass raised; names the failing pass and the passes that ran before it."""


class OutputError(EffcError):
    """The output location cannot be written (exists, not writable, ...)."""


class VerificationError(EffcError):
    """A lossless pass changed the outputs beyond tolerance, or an artifact does not match."""


def did_you_mean(word: str, choices) -> str:
    """Return ' (did you mean 'x'?)' for the closest choice, or '' when nothing is close."""
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""
