"""The report: what each pass changed, measured. A rich table on the terminal, JSON on disk."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from effc import __version__
from effc.progress import make_console

REPORT_VERSION = 1


@dataclass
class PassRecord:
    name: str
    text: str
    kind: str
    seconds: float
    modified: bool
    stats: dict
    ops_before: dict[str, int]
    ops_after: dict[str, int]
    params_before: int
    params_after: int
    bytes_before: int
    bytes_after: int
    error: dict | None = None
    note: str = ""
    lossy: bool = False

    def op_delta(self) -> dict[str, int]:
        keys = set(self.ops_before) | set(self.ops_after)
        delta = {k: self.ops_after.get(k, 0) - self.ops_before.get(k, 0) for k in sorted(keys)}
        return {k: v for k, v in delta.items() if v}


@dataclass
class Report:
    source: str
    pipeline: str
    records: list[PassRecord] = field(default_factory=list)
    calibration: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    target: str | None = None

    def to_dict(self) -> dict:
        data = {
            "report_version": REPORT_VERSION,
            "effc_version": __version__,
            "source": self.source,
            "pipeline": self.pipeline,
            "target": self.target,
            "calibration": self.calibration,
            "notes": self.notes,
            "passes": [dict(asdict(r), op_delta=r.op_delta()) for r in self.records],
        }
        if self.records:
            first, last = self.records[0], self.records[-1]
            data["summary"] = {
                "nodes_before": sum(first.ops_before.values()),
                "nodes_after": sum(last.ops_after.values()),
                "params_before": first.params_before,
                "params_after": last.params_after,
                "bytes_before": first.bytes_before,
                "bytes_after": last.bytes_after,
            }
        return data

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2, default=str) + "\n")

    def table(self) -> Table:
        table = Table(title=escape(f"effc: {self.source}  [{self.pipeline}]"), title_justify="left")
        for col in ("pass", "IR", "time s", "nodes", "params", "bytes", "changes", "output error"):
            table.add_column(
                col, justify="right" if col in ("time s", "nodes", "params", "bytes") else "left"
            )
        for r in self.records:
            err = ""
            if r.error:
                err = (
                    "identical" if r.error.get("identical") else f"max abs {r.error['max_abs']:.2e}"
                )
                if r.lossy and not r.error.get("identical"):
                    err += f", rel {r.error['max_rel']:.2e}"
                elif "floor_ratio" in r.error and not r.error.get("identical"):
                    err += f" ({r.error['floor_ratio']:.1f}x fp32 noise)"
                if not r.lossy and not r.error.get("ok", True):
                    err += " (over tolerance)"

            changes = ", ".join(
                f"{k}={v}" for k, v in r.stats.items() if not isinstance(v, (dict, list))
            )

            if not r.modified:
                changes = changes or "no change"
            table.add_row(
                escape(r.text),
                r.kind,
                f"{r.seconds:.2f}",
                f"{sum(r.ops_before.values())} -> {sum(r.ops_after.values())}",
                _delta(r.params_before, r.params_after),
                _delta(r.bytes_before, r.bytes_after, human=True),
                escape(changes),
                err,
            )
        return table

    def print(self, console: Console | None = None) -> None:
        console = console or make_console()
        console.print(self.table())
        for note in self.notes:
            console.print(escape(f"note: {note}"))


def _human(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _delta(before: int, after: int, human: bool = False) -> str:
    fmt = _human if human else (lambda v: f"{v:,}")
    return fmt(before) if before == after else f"{fmt(before)} -> {fmt(after)}"
