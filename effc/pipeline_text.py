"""The pipeline text grammar: parse and print back identically.

    pipeline := item ("," item)*
    item     := NAME options? ("(" pipeline ")")?        a group has parentheses
    options  := "{" (KEY "=" value ("," KEY "=" value)*)? "}"
    value    := number | "true" | "false" | string | "[" (value ("," value)*)? "]"
    string   := bare word (no whitespace or ,{}[]()="), or "double quoted" with \\" and \\\\

A bare word that reads as a number or a boolean is that number or boolean; to keep it a
string, quote it. Printing emits the canonical form (no spaces, strings quoted only when
needed, floats with ``repr``), so ``print_pipeline(parse_pipeline(t)) == t`` for canonical t
and ``parse_pipeline(print_pipeline(s)) == s`` for every spec s.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

from effc.errors import PassOptionError

Value = bool | int | float | str | list

_SPECIAL = set(',{}[]()="\\')
_NAME_RE = re.compile(r"[a-z][a-z0-9_-]*\Z")
_INT_RE = re.compile(r"[-+]?\d+\Z")
_FLOAT_RE = re.compile(r"[-+]?(\d+\.\d*|\.\d+|\d+)([eE][-+]?\d+)?\Z")


@dataclass
class Spec:
    """One pass (``items is None``) or a group of passes (``items`` is a list)."""

    name: str
    options: dict[str, Value] = field(default_factory=dict)
    items: list[Spec] | None = None


def _classify(word: str) -> Value:
    if word == "true":
        return True
    if word == "false":
        return False
    if _INT_RE.match(word):
        return int(word)
    if _FLOAT_RE.match(word):
        return float(word)
    return word


class _Parser:
    def __init__(self, text: str):
        self.text = text
        self.pos = 0

    def error(self, what: str) -> PassOptionError:
        return PassOptionError(f"pipeline text: {what} at column {self.pos + 1} of {self.text!r}")

    def skip_ws(self) -> None:
        while self.pos < len(self.text) and self.text[self.pos].isspace():
            self.pos += 1

    def peek(self) -> str:
        self.skip_ws()
        return self.text[self.pos] if self.pos < len(self.text) else ""

    def expect(self, ch: str) -> None:
        if self.peek() != ch:
            got = repr(self.peek()) if self.peek() else "end of text"
            raise self.error(f"expected {ch!r}, found {got}")
        self.pos += 1

    def word(self) -> str:
        self.skip_ws()
        start = self.pos
        while (
            self.pos < len(self.text)
            and self.text[self.pos] not in _SPECIAL
            and not self.text[self.pos].isspace()
        ):
            self.pos += 1
        return self.text[start : self.pos]

    def pipeline(self) -> list[Spec]:
        items = [self.item()]
        while self.peek() == ",":
            self.pos += 1
            items.append(self.item())
        return items

    def item(self) -> Spec:
        name = self.word()
        if not _NAME_RE.match(name):
            raise self.error(f"expected a pass name, found {name or self.peek() or 'nothing'!r}")
        spec = Spec(name)
        if self.peek() == "{":
            spec.options = self.options()
        if self.peek() == "(":
            self.pos += 1
            spec.items = self.pipeline()
            self.expect(")")
        return spec

    def options(self) -> dict[str, Value]:
        self.expect("{")
        opts: dict[str, Value] = {}
        if self.peek() == "}":
            self.pos += 1
            return opts
        while True:
            key = self.word()
            if not re.match(r"[A-Za-z_][A-Za-z0-9_]*\Z", key):
                raise self.error(f"expected an option name, found {key or self.peek()!r}")
            if key in opts:
                raise self.error(f"option {key!r} given twice")
            self.expect("=")
            opts[key] = self.value()
            if self.peek() == ",":
                self.pos += 1
                continue
            self.expect("}")
            return opts

    def value(self) -> Value:
        ch = self.peek()
        if ch == "[":
            self.pos += 1
            items: list[Value] = []
            if self.peek() == "]":
                self.pos += 1
                return items
            items.append(self.value())
            while self.peek() == ",":
                self.pos += 1
                items.append(self.value())
            self.expect("]")
            return items
        if ch == '"':
            return self.quoted()
        word = self.word()
        if not word:
            raise self.error(f"expected a value, found {ch or 'end of text'!r}")
        return _classify(word)

    def quoted(self) -> str:
        self.pos += 1
        out = []
        while self.pos < len(self.text):
            ch = self.text[self.pos]
            if ch == "\\" and self.pos + 1 < len(self.text):
                out.append(self.text[self.pos + 1])
                self.pos += 2
                continue
            self.pos += 1
            if ch == '"':
                return "".join(out)
            out.append(ch)
        raise self.error("unterminated string")


def parse_pipeline(text: str) -> list[Spec]:
    """Parse pipeline text into a list of specs; raise PassOptionError naming the column."""
    parser = _Parser(text)
    if not text.strip():
        raise parser.error("empty pipeline")
    items = parser.pipeline()
    if parser.peek():
        raise parser.error(f"unexpected {parser.peek()!r}")
    return items


def print_value(value: Value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise PassOptionError(f"pipeline text cannot hold the number {value}")
        return repr(value)
    if isinstance(value, str):
        bare = value and not any(c in _SPECIAL or c.isspace() for c in value)
        if bare and _classify(value) == value and isinstance(_classify(value), str):
            return value
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(print_value(v) for v in value) + "]"
    raise PassOptionError(f"pipeline text cannot hold a value of type {type(value).__name__}")


def print_spec(spec: Spec) -> str:
    text = spec.name
    if spec.options:
        text += "{" + ",".join(f"{k}={print_value(v)}" for k, v in spec.options.items()) + "}"
    if spec.items is not None:
        text += "(" + print_pipeline(spec.items) + ")"
    return text


def print_pipeline(specs: list[Spec]) -> str:
    return ",".join(print_spec(s) for s in specs)
