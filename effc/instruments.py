"""Instruments: hooks around every pass of a pipeline. They observe (verify outputs, show
progress, dump the IR); they never change the model."""

from __future__ import annotations

from pathlib import Path

import onnx
import onnx_ir as ir
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from effc.context import PassContext
from effc.errors import VerificationError
from effc.progress import make_console
from effc.report import PassRecord


class Instrument:
    """Hooks around every pass; instruments observe, they never change the model."""

    wants_error = False

    def before_pass(self, text: str, ctx: PassContext) -> None:
        pass

    def after_pass(self, record: PassRecord, model, ctx: PassContext, index: int) -> None:
        pass


class VerifyInstrument(Instrument):
    """Measure every pass's output change; fail when a lossless pass exceeds the tolerance."""

    wants_error = True

    def __init__(self, rtol: float = 1e-4, atol: float = 1e-5):
        self.rtol, self.atol = rtol, atol

    def after_pass(self, record, model, ctx, index):
        err = record.error or {}
        if not record.lossy and not err.get("ok", True):
            raise VerificationError(
                f"pass '{record.text}' is lossless but changed the outputs: max abs error "
                f"{err.get('max_abs', float('nan')):.3e} (rtol {self.rtol}, atol {self.atol})"
                + (f"; {err['reason']}" if "reason" in err else "")
            )


class ProgressInstrument(Instrument):
    """A live line on the terminal: which pass runs, how many ran, elapsed time."""

    def __init__(self, console=None):
        console = console or make_console()
        self.progress = Progress(
            SpinnerColumn(),
            TextColumn("{task.description}"),
            TimeElapsedColumn(),
            console=console,
            transient=True,
            disable=not console.is_terminal,
        )
        self.task = None
        self.done = 0

    def before_pass(self, text, ctx):
        if self.task is None:
            self.progress.start()
            self.task = self.progress.add_task("")
        self.progress.update(self.task, description=f"[{self.done} done] running {text}")

    def after_pass(self, record, model, ctx, index):
        self.done += 1

    def close(self) -> None:
        self.progress.stop()


class DumpInstrument(Instrument):
    """Write the IR after each pass into a folder (ONNX text or FX code)."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)

    def after_pass(self, record, model, ctx, index):
        self.folder.mkdir(parents=True, exist_ok=True)
        stem = f"{index:02d}-{record.name}"
        if model.kind == "onnx":
            text = onnx.printer.to_text(ir.serde.serialize_model(model.model).graph)
            (self.folder / f"{stem}.onnx.txt").write_text(text)
        else:
            (self.folder / f"{stem}.fx.py").write_text(model.graph_module.code)
