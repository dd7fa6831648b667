"""The ``effc`` command line. It parses arguments and calls the Python API, nothing more.

Errors a user can fix print one line on stderr and exit with code 2; ``--debug`` shows the
traceback instead.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

# OpenMP threads that sleep when idle instead of spinning: effc's BSR kernels run inside
# onnxruntime's threads, and spinning teams of both fight over the cores (a BSR artifact of the
# demo model ran 2-5x slower). Set before torch loads OpenMP; a user's own setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.markup import escape  # noqa: E402
from rich.table import Table  # noqa: E402

from effc import __version__, calibration, distributed, stream  # noqa: E402
from effc.artifact import prepare_output, read_manifest  # noqa: E402
from effc.backends import get_backend  # noqa: E402
from effc.check import check_models  # noqa: E402
from effc.compare import compare_artifact  # noqa: E402
from effc.compile import compile_model  # noqa: E402
from effc.context import PassContext  # noqa: E402
from effc.errors import EffcError  # noqa: E402
from effc.inputs import check_inputs, load_npz, parse_shapes, random_inputs  # noqa: E402
from effc.inspect import inspect_model, print_inspection  # noqa: E402
from effc.ir.model import InputSpec  # noqa: E402
from effc.ir.onnx_io import save_onnx  # noqa: E402
from effc.ir.torch_io import export_onnx, load_model, resolve_torch  # noqa: E402
from effc.passes.fuse.rules import RULES  # noqa: E402
from effc.pipeline import DumpInstrument, Pipeline, ProgressInstrument, registry  # noqa: E402
from effc.pipeline_text import print_value  # noqa: E402
from effc.progress import make_console  # noqa: E402
from effc.testing import GoldenMismatch, assert_golden  # noqa: E402

log = logging.getLogger("effc")
# exit codes: 0 success; 1 `effc check` found the models different; 2 a user error (argparse's
# own code too); 3 a bug in effc; 141 the output pipe closed (128 + SIGPIPE, as other tools)
EXIT_DIFFERENT, EXIT_USER, EXIT_INTERNAL, EXIT_PIPE = 1, 2, 3, 141


def _console():
    return make_console()


class _StdoutConsole(Console):
    def on_broken_pipe(self) -> None:  # rich would exit 1 itself; main() stops quietly instead
        raise BrokenPipeError


def _stdout_console():
    return _StdoutConsole(width=None if sys.stdout.isatty() else 160)


def _load(args, ref: str):

    return load_model(ref, parse_shapes(args.shape) or None, getattr(args, "task", None))


def _context(args, model=None):

    ctx = PassContext(seed=args.seed, threads=args.threads, shapes=parse_shapes(args.shape))
    if args.calib:
        ctx.calibration, ctx.calibration_info = calibration.load(
            args.calib,
            model,
            args.model,
            samples=args.calib_samples,
            seqlen=args.calib_seqlen,
            shapes=parse_shapes(args.shape),
            seed=args.seed,
        )
    return ctx


def cmd_compile(args) -> int:

    torch.set_num_threads(args.threads)
    pipeline = Pipeline.from_text(args.passes)
    if args.dump_ir:
        pipeline.instruments.append(DumpInstrument(args.dump_ir))
    if args.engine and args.target != "tensorrt":
        raise EffcError("--engine builds a TensorRT engine: it needs --target tensorrt")
    tvm_flags = (args.tvm_target, args.tuning, args.tvm_decisions, args.tvm_executor)
    if any(tvm_flags) and args.target != "tvm":
        raise EffcError(
            "--tvm-target, --tuning, --tvm-decisions and --tvm-executor choose how TVM builds: "
            "they need --target tvm"
        )
    backend_options = {"engine": args.engine} if args.engine else {}
    if args.target == "tvm":
        backend_options = {
            "tvm_target": args.tvm_target or "x86",
            "tuning": args.tuning,
            "decisions": args.tvm_decisions,
            "executor": args.tvm_executor or "auto",
        }
    prepare_output(Path(args.output), args.force)  # fail before loading a large model
    if distributed.init_from_env() and args.stream:
        raise EffcError("--stream runs in one process; under torchrun compile in memory")
    if _should_stream(args):
        return _compile_streaming(args, pipeline)
    model = _load(args, args.model)
    progress = ProgressInstrument(_console())
    pipeline.instruments.append(progress)
    try:
        result = compile_model(
            model,
            pipeline,
            args.output,
            args.target,
            _context(args, model),
            args.force,
            not args.no_verify,
            backend_options or None,
        )
    finally:
        progress.close()

    if distributed.is_main():
        result.report.print(_console())
        print(f"wrote {args.output}")
    return 0


def _should_stream(args) -> bool:
    folder = Path(args.model)
    is_hf = folder.is_dir() and (folder / "config.json").is_file()
    if args.stream and not is_hf:
        raise EffcError(
            f"--stream compresses an HF model folder block by block; {args.model} is not one"
        )
    if args.stream and args.target != "bsr":
        raise EffcError(
            f"--stream writes the bsr target's sharded weights; --target {args.target} needs the "
            "whole model in memory"
        )
    if args.stream or not is_hf or args.target != "bsr":
        return bool(args.stream)
    reason = stream.stream_reason(folder)
    if reason:
        _console().print(f"streaming block by block: {escape(reason)}")
    return reason is not None


def _compile_streaming(args, pipeline) -> int:
    ctx = _context(args, stream.StreamInputs())
    report = stream.stream_compile(
        args.model, pipeline, args.output, ctx.calibration, args.force, seed=ctx.seed
    )
    table = Table(title=f"effc compile --stream: {escape(report['pipeline'])}")
    for col in ("stage", "seconds", "RssAnon GiB", "BSR layers", "output error"):
        table.add_column(col, justify="left" if col == "stage" else "right")
    for r in report["stages"]:
        error = r.get("output_error")
        table.add_row(
            r["stage"],
            f"{r['seconds']:.1f}",
            f"{r['rss_anon'] / 2**30:.2f}",
            str(r.get("bsr_layers", "")),
            "" if error is None else f"{error:.3g}",
        )
    _console().print(table)
    for r in report["stages"]:
        if "removed" in r:
            scores = ", ".join(f"{i}: {x:.4f}" for i, x in enumerate(r["scores"]))
            _console().print(
                f"removed blocks {', '.join(map(str, r['removed']))} of {len(r['scores'])} "
                f"(scores {scores})"
            )
    if report.get("spill"):
        _console().print(
            "calibration streams were kept on disk in the work folder (they would have taken "
            f"over {stream.SPILL_FRACTION:.0%} of the available memory)"
        )
    print(f"wrote {args.output}")
    return 0


def cmd_export(args) -> int:

    out = Path(args.output)
    if out.is_dir():
        raise EffcError(f"output {out} is a folder; give the path of the .onnx file to write")
    if out.exists() and not args.force:
        raise EffcError(f"output {out} already exists; pass --force to replace it")

    module, inputs = resolve_torch(args.model, parse_shapes(args.shape) or None, args.task)
    model = export_onnx(module, inputs, legacy=args.legacy, opset=args.opset)
    files = save_onnx(model, out)
    print(f"wrote {', '.join(map(str, files))}")
    return 0


def cmd_inspect(args) -> int:

    info = inspect_model(_load(args, args.model))
    if args.json:
        print(json.dumps(info, indent=2, default=str))
    else:
        print_inspection(info, _stdout_console())
    return 0


def cmd_list_passes(args) -> int:

    passes = [cls.describe() for cls in registry().values()]
    if args.json:
        print(json.dumps(passes, indent=2, default=str))
        return 0
    table = Table(title="effc passes", title_justify="left")
    for col in ("name", "IR", "lossy", "options (default)", "what it does"):
        table.add_column(col)
    for p in passes:
        opts = ", ".join(
            f"{o['name']}: {o['type']} = {print_value(o['default'])}" for o in p["options"]
        )
        table.add_row(
            p["name"],
            "/".join(p["kinds"]),
            "yes" if p["lossy"] else "no",
            escape(opts),
            escape(p["doc"]),
        )
    console = _stdout_console()
    console.print(table)
    console.print("fuse rules: " + "; ".join(f"{k}: {r.doc}" for k, r in RULES.items()))
    console.print(
        "groups: seq(...) runs passes once; fixpoint{max_iter=N}(...) repeats until nothing changes"
    )
    return 0


def cmd_check(args) -> int:
    model = _load(args, args.model)
    if args.golden:
        if not args.update and not Path(args.golden).is_file():
            raise EffcError(
                f"golden file {args.golden} does not exist; write it with "
                f"effc check {args.model} --golden {args.golden} --update"
            )
        try:
            assert_golden(model, args.golden, args.rtol, args.atol, update=args.update)
        except GoldenMismatch as e:
            print(str(e), file=sys.stderr)
            return EXIT_DIFFERENT
        print(f"{'wrote' if args.update else 'matches'} {args.golden}")
        return 0
    if not args.other:
        raise EffcError("effc check needs a second model to compare with, or --golden FILE")

    result = check_models(
        model, _load(args, args.other), args.rtol, args.atol, args.seeds, parse_shapes(args.shape)
    )
    verdict = (
        "bit-identical"
        if result.get("identical")
        else ("equal within tolerance" if result["ok"] else "DIFFERENT")
    )
    print(
        f"{verdict}: max abs error {result.get('max_abs', float('nan')):.3e}, max rel {result.get('max_rel', float('nan')):.3e} "
        f"(rtol {args.rtol}, atol {args.atol}, {args.seeds} seeds)"
        + (f"; {result['reason']}" if "reason" in result else "")
    )
    return 0 if result["ok"] else EXIT_DIFFERENT


def cmd_run(args) -> int:
    folder = Path(args.artifact)
    manifest = read_manifest(folder)
    specs = [InputSpec(**s) for s in manifest["inputs"]]
    if args.inputs:
        inputs = load_npz(args.inputs)
    else:
        inputs = random_inputs(specs, args.seed, parse_shapes(args.shape))
    check_inputs(specs, inputs)
    backend = stream if manifest["backend"] == stream.NAME else get_backend(manifest["backend"])
    if backend is stream and args.compare:
        raise EffcError("--compare is not available for a streamed artifact yet")
    t0 = time.perf_counter()
    outputs = backend.run(folder, inputs, args.threads)
    seconds = time.perf_counter() - t0
    table = Table(
        title=f"{folder} ({manifest['backend']}, {seconds * 1e3:.1f} ms)", title_justify="left"
    )
    for col in ("output", "shape", "dtype", "mean", "std"):
        table.add_column(col)
    for name, arr in outputs.items():
        a = np.asarray(arr)
        stats = (
            (f"{a.mean():.4g}", f"{a.std():.4g}")
            if a.size and np.issubdtype(a.dtype, np.number)
            else ("", "")
        )
        table.add_row(name, str(list(a.shape)), a.dtype.name, *stats)
    _stdout_console().print(table)
    if args.compare:
        _print_comparison(folder, manifest, args, inputs)
    if args.out:
        out = Path(args.out)
        fd, tmp = tempfile.mkstemp(suffix=".npz", dir=out.parent if str(out.parent) else ".")
        os.close(fd)
        try:
            np.savez(tmp, **outputs)
            os.replace(tmp, out)
        finally:
            Path(tmp).unlink(missing_ok=True)
        print(f"wrote {out}")
    return 0


def _print_comparison(folder: Path, manifest: dict, args, inputs: dict) -> None:
    reference = _load(args, args.compare)
    rows = compare_artifact(folder, manifest["backend"], reference, inputs, args.threads)
    table = Table(
        title=f"{folder} against {args.compare} (reference: onnxruntime, all optimizations; "
        f"artifact: its own runtime; {args.threads} threads, median of 20 interleaved runs)",
        title_justify="left",
    )
    for col in ("model", "size", "ms", "speedup", "max abs error", "max rel error"):
        table.add_column(col, justify="left" if col == "model" else "right")
    for r in rows:
        err = ("", "") if "max_abs" not in r else (f"{r['max_abs']:.3g}", f"{r['max_rel']:.3g}")
        table.add_row(
            r["model"],
            f"{r['bytes'] / 2**20:.1f} MiB",
            f"{r['ms']:.2f}",
            f"{r['speedup']:.2f}x",
            *err,
        )
    _stdout_console().print(table)


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:

    parser = argparse.ArgumentParser(
        prog="effc", description="Make neural networks smaller and faster, with proof."
    )
    parser.add_argument("--version", action="version", version=f"effc {__version__}")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", help="show tracebacks")
    common.add_argument("-v", "--verbose", action="store_true", help="log what happens")
    common.add_argument(
        "--shape", action="append", metavar="NAME=DIMS", help="input shape, e.g. input_ids=1x128"
    )
    common.add_argument(
        "--threads",
        type=_positive,
        default=2,
        help="threads for torch, onnxruntime and OpenMP",
    )
    common.add_argument("--seed", type=int, default=0)
    common.add_argument("--task", choices=["causal-lm", "base"], help="HF folder: force the task")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser(
        "compile", parents=[common], help="run a pass pipeline and write an artifact folder"
    )
    p.add_argument("model", help="an .onnx file, an HF folder, builtin:NAME or py:MODULE:FACTORY")
    p.add_argument("--passes", required=True, help='pipeline text, e.g. "cleanup,fuse"')
    p.add_argument("-o", "--output", required=True, help="artifact folder to create")
    p.add_argument("--target", default="onnxruntime")
    p.add_argument("--force", action="store_true", help="replace an existing output folder")
    p.add_argument(
        "--stream",
        action="store_true",
        help="HF folder, --target bsr: compress block by block from the memory-mapped files "
        "(chosen by itself when the model would not fit in memory)",
    )
    p.add_argument(
        "--calib",
        help="calibration inputs: .npz (arrays stacked as N x input shape), .txt (LM text) or "
        "'images' (crops of bundled photographs for an image model) or 'synthetic' (images "
        "synthesized from a torch model's BatchNorm statistics: no data needed); "
        "'SOURCE+synthetic' (e.g. images+synthetic, x.npz+synthetic) adds as many synthesized "
        "images as SOURCE gives",
    )
    p.add_argument(
        "--calib-samples", type=int, default=0, help="use at most this many samples (0: all)"
    )
    p.add_argument(
        "--calib-seqlen", type=int, default=512, help="tokens per text calibration sample"
    )
    p.add_argument("--dump-ir", metavar="DIR", help="write the IR after every pass into DIR")
    p.add_argument("--no-verify", action="store_true", help="skip output checks after each pass")
    p.add_argument(
        "--engine",
        choices=["fp32", "fp16", "int8"],
        help="--target tensorrt: also build a TensorRT engine (needs tensorrt and an NVIDIA GPU)",
    )
    p.add_argument(
        "--tvm-target",
        choices=["x86", "aarch64", "wasm32"],
        help="--target tvm: the machine to build for (default x86, this CPU's features)",
    )
    p.add_argument(
        "--tuning",
        metavar="DIR",
        help="--target tvm: a meta-schedule tuning database (python -m tools.tune_tvm)",
    )
    p.add_argument(
        "--tvm-decisions",
        metavar="FILE",
        help="--target tvm: pinned sparse/dense choices per layer (an artifact's decisions.json)",
    )
    p.add_argument(
        "--tvm-executor",
        choices=["auto", "aot", "vm"],
        help="--target tvm, x86: effc's ahead-of-time executor (static shapes), TVM's relax VM, "
        "or auto (default: effc's where the model allows it)",
    )
    p.set_defaults(func=cmd_compile)

    p = sub.add_parser("export", parents=[common], help="write ONNX from a torch model")
    p.add_argument("model")
    p.add_argument("-o", "--output", required=True)
    p.add_argument("--legacy", action="store_true", help="use the TorchScript exporter")
    p.add_argument("--opset", type=int)
    p.add_argument("--force", action="store_true")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("inspect", parents=[common], help="ops, parameters, bytes, sparsity, I/O")
    p.add_argument("model")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser(
        "list-passes", parents=[common], help="the passes, their options and defaults"
    )
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_list_passes)

    p = sub.add_parser(
        "check", parents=[common], help="compare two models, or one with a golden file"
    )
    p.add_argument("model")
    p.add_argument("other", nargs="?")
    p.add_argument("--rtol", type=float, default=1e-4)
    p.add_argument("--atol", type=float, default=1e-5)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--golden", help="golden JSON file to hold the model to")
    p.add_argument("--update", action="store_true", help="(re)write the golden file")
    p.set_defaults(func=cmd_check)

    p = sub.add_parser("run", parents=[common], help="run an artifact folder")
    p.add_argument("artifact")
    p.add_argument("--inputs", help=".npz of named inputs (random when omitted)")
    p.add_argument("--out", help="write the outputs to this .npz")
    p.add_argument(
        "--compare",
        metavar="MODEL",
        help="also run MODEL (the source: .onnx, builtin:NAME, ...) on the same inputs and print "
        "size, latency and output error side by side",
    )
    p.set_defaults(func=cmd_run)
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # usage errors (2), --help and --version (0): a code, not an exit
        return int(e.code or 0)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(name)s: %(message)s"
    )
    if not args.debug:
        _quiet_third_party()
    try:
        return args.func(args)
    except BrokenPipeError:  # the reader went away (effc inspect m.onnx | head): stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_PIPE
    except EffcError as e:
        if args.debug:
            raise
        print(f"effc: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("effc: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        if args.debug:
            raise
        msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
        print(
            f"effc: internal error: {type(e).__name__}: {msg} (a bug in effc: rerun with --debug "
            "for the traceback and report it)",
            file=sys.stderr,
        )
        return EXIT_INTERNAL


def _quiet_third_party() -> None:
    import warnings

    warnings.filterwarnings("ignore")
    for name in ("torch", "torch.onnx", "torch._export", "onnxscript", "onnx_ir"):
        logging.getLogger(name).setLevel(logging.ERROR)


if __name__ == "__main__":
    sys.exit(main())
