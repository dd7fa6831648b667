"""Pipeline: a pass made of passes. Runs them in order (or to a fixpoint), lowers FX to ONNX once
at the boundary where the next pass needs ONNX, measures each pass, and names the failing pass
and those that ran before it when something breaks."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx_ir as ir
from torch import nn

import effc.passes  # noqa: F401  (registers the built-in passes)
from effc.context import PassContext
from effc.errors import EffcError, InputError, PassFailedError, PassOptionError, did_you_mean
from effc.inputs import as_arrays, check_inputs, describe, random_inputs
from effc.instruments import (
    DumpInstrument,
    Instrument,
    ProgressInstrument,
    VerifyInstrument,
)
from effc.ir.model import FxModel, OnnxModel
from effc.ir.onnx_io import deduplicate_initializers
from effc.ir.torch_io import example_inputs_for, export_onnx, load_model
from effc.numerics import FLOOR_MULTIPLE, compare_runs, noise_floor
from effc.pass_base import Pass, PassResult
from effc.pipeline_text import Spec, parse_pipeline, print_pipeline
from effc.registry import PASSES
from effc.report import PassRecord, Report

log = logging.getLogger(__name__)

GROUPS = {
    "seq": "run the passes once, in order",
    "fixpoint": "repeat until no pass changes the model",
}


__all__ = [
    "DumpInstrument",
    "Instrument",
    "Pipeline",
    "PipelineResult",
    "ProgressInstrument",
    "VerifyInstrument",
    "as_model",
    "create_pass",
    "ensure_onnx",
    "registry",
]


@dataclass
class PipelineResult(PassResult):
    report: Report | None = None


def registry() -> dict[str, type[Pass]]:
    """Every registered pass by name (the built-in ones and any a user registered)."""
    return PASSES


def create_pass(spec: Spec) -> Pass:
    """Build a pass (or a group) from a parsed spec; unknown names suggest the closest one."""
    if spec.items is not None:
        if spec.name not in GROUPS:
            raise PassOptionError(
                f"unknown group '{spec.name}'{did_you_mean(spec.name, GROUPS)}; groups: {', '.join(GROUPS)}"
            )
        return Pipeline.from_spec(spec)
    if spec.name not in PASSES:
        hint = did_you_mean(spec.name, PASSES)
        raise PassOptionError(
            f"unknown pass '{spec.name}'{hint}; run `effc list-passes` to see them"
        )
    return PASSES[spec.name](**spec.options)


def eval_inputs(ctx: PassContext, model) -> list[dict]:
    """The inputs a pass's output change is measured on: calibration inputs when given (at most
    ``ctx.error_samples``), else ``ctx.eval_seeds`` random input sets."""
    if ctx.calibration:
        return ctx.calibration[: ctx.error_samples]
    specs, vocab = model.input_specs(), model.vocab_hint()
    return [random_inputs(specs, ctx.seed + i, ctx.shapes, vocab) for i in range(ctx.eval_seeds)]


def as_model(model, shapes: dict | None = None):
    """Accept FxModel/OnnxModel, nn.Module, onnx_ir.Model or a model reference string."""
    if isinstance(model, (FxModel, OnnxModel)):
        return model
    if isinstance(model, ir.Model):
        return OnnxModel(model)
    if isinstance(model, nn.Module):
        return FxModel(model.eval(), example_inputs_for(model, shapes, type(model).__name__))
    if isinstance(model, (str, Path)):
        return load_model(str(model), shapes)
    raise TypeError(f"cannot make a model of {type(model).__name__}")


def lower_to_onnx(model):
    """FX -> ONNX with the dynamo exporter. The source module keeps its module names in the
    ONNX metadata, so it is exported unless a structural FX pass rewrote the graph."""
    source = model.graph_module if model.graph_modified else model.module
    with model.plain_outputs():
        exported = export_onnx(source, model.example_inputs)
    # a parameter several blocks share (share-blocks) is written once per use: one initializer
    # again, so ONNX passes see one weight site with every reader (only weight-sized tensors)
    deduplicate_initializers(exported, min_elements=256)
    return OnnxModel(exported, compression=model.compression)


def snapshot(model) -> tuple[dict, int, int]:
    """Op histogram, parameter count and bytes: what a PassRecord compares before and after."""
    return model.op_histogram(), *model.param_stats()


def measured_step(name: str, text: str, kind: str, model, step):
    """Run ``step(model) -> (model, modified, stats)``, timed, with a PassRecord of what changed."""
    ops0, params0, bytes0 = snapshot(model)
    t0 = time.perf_counter()
    new, modified, stats = step(model)
    seconds = time.perf_counter() - t0
    ops1, params1, bytes1 = snapshot(new)
    record = PassRecord(
        name, text, kind, seconds, modified, stats, ops0, ops1, params0, params1, bytes0, bytes1
    )
    return new, record


def ensure_onnx(model, report: Report, why: str, instruments: list[Instrument] = ()):
    """Lower an FX model to ONNX (once, at the boundary) and record it in the report."""
    if model.kind == "onnx":
        return model
    for inst in instruments:
        inst.before_pass("(FX -> ONNX)", None)
    log.info("lowering FX -> ONNX for %s", why)
    onnx_model, record = measured_step(
        "lower-fx-onnx", "(FX -> ONNX)", "fx->onnx", model, lambda m: (lower_to_onnx(m), True, {})
    )
    report.records.append(record)
    report.notes.append(f"lowered FX -> ONNX (dynamo exporter) for {why}")
    return onnx_model


class Pipeline(Pass):
    """Run passes in order; as a group, ``seq(...)`` or ``fixpoint(...)``."""

    name = "pipeline"

    def __init__(
        self,
        passes: list[Pass | str],
        group: str = "seq",
        max_iter: int = 10,
        instruments: list[Instrument] | None = None,
    ):
        self.passes: list[Pass] = []
        for p in passes:
            if isinstance(p, str):
                self.passes.extend(Pipeline.from_text(p).passes)
            else:
                self.passes.append(p)
        self.group = group
        self.max_iter = max_iter
        self.given = {"max_iter": max_iter} if max_iter != 10 else {}
        self.instruments = list(instruments or [])

    @classmethod
    def from_text(cls, text: str, **kwargs) -> Pipeline:
        return cls([create_pass(s) for s in parse_pipeline(text)], **kwargs)

    @classmethod
    def from_spec(cls, spec: Spec) -> Pipeline:
        opts = dict(spec.options)
        max_iter = opts.pop("max_iter", 10)
        if opts or not isinstance(max_iter, int) or isinstance(max_iter, bool) or max_iter < 1:
            raise PassOptionError(
                f"group '{spec.name}' takes only max_iter (a positive integer), got {spec.options}"
            )
        return cls([create_pass(s) for s in spec.items or []], group=spec.name, max_iter=max_iter)

    def spec(self) -> Spec:
        return Spec(self.group, dict(self.given), [p.spec() for p in self.passes])

    @property
    def text(self) -> str:
        return print_pipeline([p.spec() for p in self.passes])

    def __repr__(self) -> str:
        return f"Pipeline({self.text!r})"

    def run(self, model, ctx: PassContext | None = None) -> PipelineResult:
        """Run on any model form (see ``as_model``); returns the model and its Report."""
        ctx = ctx or PassContext()
        model = as_model(model, ctx.shapes)
        self._preflight(model, ctx)
        report = Report(source=model.source, pipeline=self.text, calibration=ctx.calibration_info)
        state = _RunState(self.instruments, report)
        model, modified = self._execute(model, ctx, state)
        return PipelineResult(model, modified, {"passes": len(report.records)}, report)

    def __call__(self, model, ctx) -> PassResult:
        return self.run(model, ctx)

    def leaves(self) -> list[Pass]:
        return [q for p in self.passes for q in (p.leaves() if isinstance(p, Pipeline) else [p])]

    def _preflight(self, model, ctx: PassContext) -> None:
        """What can be known wrong before any pass runs: calibration a pass needs but nobody
        gave, calibration that does not fit the model, NaN or infinite weights and inputs."""
        if model.kind == "onnx":  # an ONNX model never becomes a torch one again
            for p in self.leaves():
                p.check_kind(model)
        ctx.keep_teacher = ctx.keep_teacher or any(p.wants_teacher for p in self.leaves())
        needy = [p.name for p in self.leaves() if p.needs_calibration()]
        if needy and not ctx.calibration:
            raise InputError(
                f"pass '{needy[0]}' needs calibration inputs (--calib FILE: .npz of the model's "
                "inputs stacked as N x shape, or .txt for an HF language model) and none were given"
            )
        ctx.calibration = [as_arrays(sample) for sample in ctx.calibration]
        for i, sample in enumerate(ctx.calibration):
            try:
                check_inputs(model.input_specs(), sample, sizes=model.kind == "onnx")
            except InputError as e:
                raise InputError(f"calibration sample {i}: {e}") from e
            for name, a in sample.items():
                if np.issubdtype(a.dtype, np.floating) and not np.isfinite(a).all():
                    raise InputError(
                        f"calibration sample {i}: input '{name}' has NaN or Inf values"
                    )
        bad = model.nonfinite_weights()
        if bad:
            raise InputError(
                f"the model has NaN or Inf weights: {', '.join(bad[:3])}"
                + (f" and {len(bad) - 3} more" if len(bad) > 3 else "")
            )

    def _execute(self, model, ctx, state: _RunState):
        any_modified = False
        for iteration in range(self.max_iter if self.group == "fixpoint" else 1):
            changed = False
            for p in self.passes:
                if isinstance(p, Pipeline):
                    model, mod = p._execute(model, ctx, state)
                else:
                    model, mod = state.run_pass(p, model, ctx, iteration)
                changed |= mod
            any_modified |= changed
            if not changed:
                break
        return model, any_modified


@dataclass
class _Baseline:
    """What the verifier knows of the current model state: its outputs on the verification
    inputs, and (computed when a lossless pass needs it) its fp32 noise floor; for a graph with
    activation Q/DQ the same for its float semantics (Q/DQ stripped)."""

    outputs: list
    floors: list[float] | None = None
    stripped: tuple | None = None  # (outputs, floors) of the Q/DQ-stripped model


def _floors(model, inputs, outputs) -> list[float]:
    return noise_floor(outputs, [model.run_nudged(inputs, seed) for seed in (0, 1)])


@dataclass
class _RunState:
    instruments: list[Instrument]
    report: Report
    baseline: _Baseline | None = None  # of the current model state, while it is unchanged
    inputs: list | None = None
    ran: list[str] = field(default_factory=list)

    def _verifier(self) -> VerifyInstrument | None:
        return next((i for i in self.instruments if isinstance(i, VerifyInstrument)), None)

    def _base(self, model, ctx) -> _Baseline:
        if self.inputs is None:
            self.inputs = eval_inputs(ctx, model)
            if ctx.calibration:
                self.report.notes.append(
                    f"outputs compared on {len(self.inputs)} calibration samples"
                )
            else:
                lines = describe(model.input_specs(), ctx.shapes)
                self.report.notes.append(
                    f"outputs compared on {len(self.inputs)} random input sets: " + "; ".join(lines)
                )
        if self.baseline is None:
            self.baseline = _Baseline(model.run_all(self.inputs))
        return self.baseline

    def _boundary(self, p: Pass, model, ctx):
        if model.kind == "fx" and "fx" not in p.kinds and "onnx" in p.kinds:
            model = ensure_onnx(model, self.report, f"pass '{p.name}'", self.instruments)
            self.ran.append("(FX -> ONNX)")
            self.baseline = None
        return model

    def _prepare(self, p: Pass, model, verifier) -> None:
        """Before a lossless pass: the noise floor of the state it starts from (once per state)."""
        base = self.baseline
        if verifier is None or p.lossy or p.bitwise:
            return
        if model.kind == "onnx" and model.has_activation_qdq():
            if base.stripped is None:
                stripped = model.without_activation_qdq()
                outs = stripped.run_all(self.inputs)
                base.stripped = (outs, _floors(stripped, self.inputs, outs))
        elif base.floors is None:
            base.floors = _floors(model, self.inputs, base.outputs)

    def _error(self, p: Pass, model, base: _Baseline, after: list, verifier) -> dict:
        rtol, atol, k = (
            (verifier.rtol, verifier.atol, verifier.floor_multiple)
            if verifier
            else (1e-4, 1e-5, FLOOR_MULTIPLE)
        )
        if verifier is None or p.lossy:
            return compare_runs(base.outputs, after, rtol, atol)
        if p.bitwise:
            error = compare_runs(base.outputs, after, rtol, atol)
            return dict(error, ok=error["identical"], rule="bitwise")
        if base.stripped is not None:  # float semantics: one ulp may flip a quantization step
            outs, floors = base.stripped
            stripped = compare_runs(
                outs, model.without_activation_qdq().run_all(self.inputs), rtol, atol, floors, k
            )
            with_qdq = compare_runs(base.outputs, after, rtol, atol)
            return dict(stripped, rule="activation Q/DQ stripped", with_qdq=with_qdq)
        error = compare_runs(base.outputs, after, rtol, atol, base.floors, k)
        return dict(error, rule="tolerance" if error["within_tolerance"] else "noise floor")

    def run_pass(self, p: Pass, model, ctx, iteration: int):
        text = Pipeline([p]).text
        try:
            model = self._boundary(p, model, ctx)
            p.check_kind(model)  # before measuring anything on a model the pass cannot take
            p.requires(model, ctx)

            for inst in self.instruments:
                inst.before_pass(text, ctx)
            verifier = self._verifier()
            measure = (p.lossy and bool(ctx.calibration)) or verifier is not None
            if measure:
                base = self._base(model, ctx)
                self._prepare(p, model, verifier)

            def step(m):
                result = p.run(m, ctx)
                p.ensures(result.model, ctx)
                return result.model, result.modified, result.stats

            model, record = measured_step(p.name, text, model.kind, model, step)
            record.note = f"iteration {iteration + 1}" if iteration else ""
            record.lossy = p.lossy
            if measure:  # also when the pass says it changed nothing: it may be wrong
                after = model.run_all(self.inputs)
                record.error = self._error(p, model, base, after, verifier)
                if not record.error.get("identical"):
                    self.baseline = _Baseline(after)
            elif record.modified:
                self.baseline = None
            self.report.records.append(record)
            for inst in self.instruments:
                inst.after_pass(record, model, ctx, len(self.report.records))
        except EffcError as e:
            raise type(e)(self._where(text) + str(e)) from e
        except Exception as e:
            raise PassFailedError(f"{self._where(text)}{type(e).__name__}: {e}") from e
        self.ran.append(text)
        return model, record.modified

    def _where(self, text: str) -> str:
        before = ", ".join(self.ran) if self.ran else "none"
        return f"in pass '{text}' (passes run before it: {before}): "
