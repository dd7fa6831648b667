"""Instruments: hooks around every pass of a pipeline. They observe (verify outputs, show
progress, dump the IR); they never change the model."""

from __future__ import annotations

from pathlib import Path

import onnx
import onnx_ir as ir

from effc.context import PassContext
from effc.errors import VerificationError
from effc.numerics import FLOOR_MULTIPLE
from effc.progress import spinner
from effc.report import PassRecord


class Instrument:
    """Hooks around every pass; instruments observe, they never change the model."""

    wants_error = False

    def before_pass(self, text: str, ctx: PassContext) -> None:
        pass

    def after_pass(self, record: PassRecord, model, ctx: PassContext, index: int) -> None:
        pass


class VerifyInstrument(Instrument):
    """Measure every pass's output change; fail when a lossless pass changes the outputs beyond
    ``rtol``/``atol`` and beyond ``floor_multiple`` times the model's own fp32 noise floor
    (``effc.numerics``), or when a pass that only moves data changes a single bit."""

    wants_error = True

    def __init__(
        self, rtol: float = 1e-4, atol: float = 1e-5, floor_multiple: float = FLOOR_MULTIPLE
    ):
        self.rtol, self.atol, self.floor_multiple = rtol, atol, floor_multiple

    def after_pass(self, record, model, ctx, index):
        err = record.error or {}
        if record.lossy or err.get("ok", True):
            return
        if err.get("rule") == "bitwise":
            raise VerificationError(
                f"pass '{record.text}' only moves data but changed the outputs (max abs error "
                f"{err.get('max_abs', float('nan')):.3e}; it must be bit-identical)"
            )
        floor = (
            f", {err['floor_ratio']:.1f}x the model's fp32 noise floor {err['floor']:.2e} "
            f"(allowed {self.floor_multiple:g}x)"
            if "floor" in err
            else ""
        )
        raise VerificationError(
            f"pass '{record.text}' is lossless but changed the outputs: max abs error "
            f"{err.get('max_abs', float('nan')):.3e} (rtol {self.rtol}, atol {self.atol}{floor})"
            + (f"; {err['reason']}" if "reason" in err else "")
        )


class ProgressInstrument(Instrument):
    """A live line on the terminal: which pass runs, how many ran, elapsed time."""

    def __init__(self, console=None):
        self.progress, self.task = spinner("", console)
        self.started = False
        self.done = 0

    def before_pass(self, text, ctx):
        if not self.started:
            self.progress.start()
            self.started = True
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
