"""The Python API behind ``effc compile``: load, run the pipeline, lower, write the artifact."""

from __future__ import annotations

import time
from pathlib import Path

from effc import __version__, distributed
from effc.artifact import prepare_output, write_artifact
from effc.backends import get_backend
from effc.context import PassContext
from effc.ir.onnx_io import deduplicate_initializers
from effc.pipeline import Pipeline, PipelineResult, VerifyInstrument, ensure_onnx


def compile_model(
    model,
    passes: str | Pipeline,
    out: str | Path,
    target: str = "onnxruntime",
    ctx: PassContext | None = None,
    force: bool = False,
    verify: bool = True,
    backend_options: dict | None = None,
) -> PipelineResult:
    """Compile ``model`` (any form ``Pipeline.run`` accepts) into the artifact folder ``out``;
    ``backend_options`` go to the backend's ``lower`` (e.g. ``engine="fp16"`` for tensorrt)."""
    out = Path(out)
    prepare_output(out, force)
    backend = get_backend(target)
    pipeline = passes if isinstance(passes, Pipeline) else Pipeline.from_text(passes)
    # the target's legalization passes, unless the pipeline already names them (with options,
    # e.g. bsr-pack{activations=int8})
    named = {getattr(p, "name", None) for p in pipeline.passes}
    legal = [text for text in backend.legalization() if text.split("{")[0] not in named]
    if legal:
        pipeline = Pipeline([*pipeline.passes, *legal], instruments=pipeline.instruments)

    if verify and not any(isinstance(i, VerifyInstrument) for i in pipeline.instruments):
        pipeline.instruments.append(VerifyInstrument())
    result = pipeline.run(model, ctx or PassContext())
    report = result.report
    report.target = backend.NAME
    final = ensure_onnx(result.model, report, f"the {backend.NAME} target", pipeline.instruments)
    manifest = {
        "effc_version": __version__,
        "backend": backend.NAME,
        "pipeline": pipeline.text,
        "source": report.source,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "inputs": [vars(s) for s in final.input_specs()],
        "outputs": [
            {
                "name": v.name,
                "shape": [d if isinstance(d, int) else str(d) for d in (v.shape or [])],
                "dtype": v.dtype.numpy().name if v.dtype is not None else None,
            }
            for v in final.model.graph.outputs
        ],
    }

    # identical weights are stored once (parameters shared by share-blocks, which the exporter
    # writes once per use); after every pass, so no pass edits a weight two nodes now share
    if deduplicate_initializers(final.model):
        report.notes.append("identical weights are stored once in the artifact")

    if not distributed.is_main():  # every process computed the same model; one writes it
        result.model = final
        return result

    def build(folder: Path) -> None:
        backend.lower(final.model, folder, **(backend_options or {}))
        if hasattr(backend, "describe"):
            report.notes.extend(backend.describe(folder))

        report.save(folder / "report.json")

    write_artifact(out, build, manifest, force=force)
    result.model = final
    return result
