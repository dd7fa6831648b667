"""The TVM target: the model compiled by Apache TVM (0.27, relax) for x86, aarch64 or wasm32.

``legalization()`` appends ``fixpoint(cleanup,fuse)`` and ``tvm-legalize`` (static shapes,
folded shape math, importer-friendly Constant/Resize forms). ``lower`` imports the ONNX graph
with TVM's relax ONNX frontend, builds it with TVM's default pipeline for the target (or with a
meta-schedule tuning database, ``tuning=DIR``) and writes:

    model.onnx     the legalized graph (the reference the artifact is checked against)
    model.so       x86_64 / aarch64: the compiled relax VM executable (a shared library)
    model.wasm     wasm32: a WASI module, effc's executor linked with the compiled kernels,
                   with plan.txt and weights.bin beside it (backends/tvm_aot.py)
    tvm.json       target, TVM version, input/output order, tuning database used, and each
                   candidate layer for effc's kernels (block-sparse 1x1 convs, depthwise
                   and KxK convs: backends/tvm_sparse.py, backends/tvm_conv.py) with its choice

``run`` loads ``model.so`` into TVM's relax VM when the artifact's target is this machine's
(x86_64). An aarch64 artifact on an x86_64 machine runs for real under ``qemu-aarch64``: effc's
host program (``backends/tvm_host/run_vm.cc``, no Python) is cross-compiled against the aarch64
TVM runtime and tvm-ffi libraries (taken from PyPI's manylinux aarch64 wheels of the same
versions, once, into the cache folder) and runs the executable on the inputs. Timings under qemu
mean nothing; numerics are checked against the x86 build. A wasm32 artifact runs under wasmtime
(PyPI ``wasmtime``) in effc's ahead-of-time executor, since TVM's web runtime cannot be built
here (``tvm_aot``). TVM is an optional dependency (``pip install 'effc[tvm]'``);
without it the target says so in one line.

From FX: ``lower_fx`` imports a ``torch.export`` program with TVM's ``from_exported_program``
for the same build.
"""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path

import numpy as np
import onnx_ir as ir

import effc.backends.tvm_aot as tvm_aot
import effc.backends.tvm_conv as tvm_conv
import effc.backends.tvm_sparse as tvm_sparse
from effc.backends.onnxruntime import lower as save_reference
from effc.cache import cache_dir
from effc.errors import UnsupportedError

NAME = "tvm"
MODEL_FILE = "model.onnx"
LIB_FILE = {"x86": "model.so", "aarch64": "model.so", "wasm32": "model.wasm"}
AOT_LIB = "model_aot.so"  # x86 with effc's executor (the default where the model allows it)
EXECUTORS = ("auto", "aot", "vm")
META_FILE = "tvm.json"
DECISIONS_FILE = "decisions.json"
TARGETS = ("x86", "aarch64", "wasm32")


def legalization() -> list[str]:
    return ["fixpoint(cleanup,fuse)", "tvm-legalize"]


def tvm():
    """The tvm package, or a one-line error naming how to install it."""
    try:
        import tvm as _tvm
        from tvm import relax  # noqa: F401
    except ImportError as e:
        raise UnsupportedError(
            f"the tvm target needs Apache TVM: pip install 'effc[tvm]' ({e})"
        ) from e
    return _tvm


def target_for(name: str):
    """TVM 0.27 target (a JSON dict) for x86 (this CPU's features when it is x86_64),
    aarch64 (NEON) or wasm32 (SIMD128)."""
    t = tvm()
    if name == "x86":
        spec = {"kind": "llvm", "mtriple": "x86_64-linux-gnu"}
        if platform.machine() == "x86_64":
            spec["mcpu"] = t.target.codegen.llvm_get_system_cpu()
        spec["num-cores"] = os.cpu_count() or 1
    elif name == "aarch64":
        spec = {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": ["+neon"]}
    elif name == "wasm32":
        spec = {"kind": "llvm", "mtriple": "wasm32-unknown-unknown-wasm", "mattr": ["+simd128"]}
    else:
        raise UnsupportedError(f"unknown TVM target {name!r}; available: {', '.join(TARGETS)}")
    return t.target.Target(spec)


def import_onnx(model: ir.Model):
    """The relax IRModule of an ONNX graph (weights bound as constants)."""
    tvm()
    from tvm.relax.frontend.onnx import from_onnx

    proto = ir.serde.serialize_model(model)
    try:
        mod = from_onnx(proto, keep_params_in_input=False)
    except Exception as e:  # the importer raises bare ValueError/AssertionError/TypeError
        first = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        raise UnsupportedError(f"TVM's ONNX importer refused the graph: {first}") from e
    return mod


def import_fx(exported):
    """The relax IRModule of a ``torch.export`` program (TVM's from_exported_program)."""
    tvm()
    from tvm.relax.frontend.torch import from_exported_program

    return from_exported_program(exported, keep_params_as_input=False)


def fused(mod, target, tuning: str | Path | None = None):
    """The module as meta-schedule's compile path sees it before applying a database: operators
    legalized to TensorIR and fused (the tasks a tuning run extracts); with ``tuning``, the
    database's schedules applied to the kernels it covers, as ``build`` does."""
    t = tvm()
    from tvm import relax

    seq = t.transform.Sequential(
        [
            relax.transform.LegalizeOps(),
            relax.transform.AnnotateTIROpPattern(),
            relax.transform.FoldConstant(),
            relax.transform.FuseOps(),
            relax.transform.FuseTIR(),
        ]
    )
    with target, t.transform.PassContext(opt_level=3):
        mod = seq(mod)
    if tuning is None:
        return mod
    with target, load_database(tuning), t.transform.PassContext(opt_level=3):
        return relax.transform.MetaScheduleApplyDatabase(enable_warning=False)(mod)


def build(mod, target, tuning: str | Path | None = None):
    """A relax VM executable: TVM's default pipeline, or one that applies a tuning database."""
    t = tvm()
    if tuning is None:
        return t.compile(mod, target=target)
    from tvm.s_tir import meta_schedule as ms

    db = load_database(tuning)
    with target, t.transform.PassContext(opt_level=3):
        return ms.relax_integration.compile_relax(db, mod, target, params=None)


def load_database(folder: str | Path):
    from tvm.s_tir import meta_schedule as ms

    folder = Path(folder)
    records = folder / "database_tuning_record.json"
    workloads = folder / "database_workload.json"
    if not records.is_file() or not workloads.is_file():
        raise UnsupportedError(
            f"{folder} is not a meta-schedule database (database_workload.json and "
            "database_tuning_record.json)"
        )
    return ms.database.JSONDatabase(str(workloads), str(records), allow_missing=False)


def export(executable, path: Path, tvm_target: str) -> None:
    """Write the executable as a shared library (x86, aarch64 with the cross g++) or a wasm
    system library."""
    if tvm_target == "x86":
        executable.export_library(str(path))
    elif tvm_target == "aarch64":
        from tvm.support import cc

        compiler = os.environ.get("EFFC_AARCH64_CXX", "aarch64-linux-gnu-g++")
        if not _which(compiler):
            raise UnsupportedError(
                f"the aarch64 target needs a cross compiler ({compiler}): "
                "apt install g++-aarch64-linux-gnu"
            )
        executable.export_library(str(path), fcompile=cc.cross_compiler(compiler))
    else:
        raise UnsupportedError("a wasm32 build is written by tvm_aot, not exported")


def _which(cmd: str) -> bool:
    from shutil import which

    return which(cmd) is not None


def decider(target, tvm_target: str, tuning=None, decisions: str | None = None):
    """How each layer is chosen, as (decide, decide_conv) for ``tvm_sparse.sparsify``: a
    pinned decision file; on this machine's own target a measurement (effc's kernel where it is
    faster than TVM's dense operator, built alone with the layer's bias and clamp and the tuning
    database, by more than 5% and 2 µs); for wasm32 the same measurement in the WebAssembly
    runtime (wasmtime, effc's executor) where the toolchain is installed; on another cross target
    a cost model (a sparse 1x1 conv where at most COST_MODEL_MAX_DENSITY of the blocks are kept;
    effc's direct conv kernel everywhere, see docs/targets.md)."""
    pinned = tvm_sparse.load_decisions(decisions) if decisions else {}
    measure = tvm_target == _host_target() or (tvm_target == "wasm32" and tvm_aot.can_run_wasm())
    lanes = tvm_sparse.lanes_for(target)

    def wins(dense_us: float, kernel_us: float) -> bool:
        return dense_us - kernel_us > max(0.05 * dense_us, 2.0)

    def wasm_us(dense_mod) -> tuple[float, float]:
        """(dense, kernel) µs of a one-layer module in the WebAssembly runtime."""
        kernel_mod, _ = tvm_sparse.sparsify(
            dense_mod, target, lambda *a: "sparse", decide_conv=lambda *a: "kernel"
        )
        return tuple(
            tvm_aot.time_module(fused(m, target), target, "wasm32") * 1e3
            for m in (dense_mod, kernel_mod)
        )

    def decide(cand, w2d, n, c, pixels, ep) -> str:
        if cand.key in pinned:
            cand.why = "decision file"
            return pinned[cand.key]
        if not measure:
            cand.why = f"cost model (density <= {tvm_sparse.COST_MODEL_MAX_DENSITY})"
            return "sparse" if cand.density <= tvm_sparse.COST_MODEL_MAX_DENSITY else "dense"
        if tvm_target == "wasm32":  # in the WebAssembly runtime, through effc's executor
            cand.dense_us, cand.sparse_us = wasm_us(
                tvm_sparse.pointwise_module(w2d, n, c, pixels, ep)[0]
            )
            cand.why = "measured under wasmtime"
        else:
            cand.dense_us, cand.sparse_us = tvm_sparse.measure_pointwise(
                lambda m: build(m, target, tuning), target, w2d, n, c, pixels, cand.rows, ep
            )
            cand.why = "measured"
        return "sparse" if wins(cand.dense_us, cand.sparse_us) else "dense"

    def decide_conv(cand, w, shape, ep) -> str:
        if cand.key in pinned:
            cand.why = "decision file"
            return pinned[cand.key]
        if not measure:
            cand.why = "cost model (the kernel everywhere)"
            return "kernel"
        if tvm_target == "wasm32":
            n, _, h, wd, _, _, s, p, groups = shape
            mod, _ = tvm_conv.conv_module(w, n, h, wd, s, p, groups, ep)
            cand.dense_us, cand.kernel_us = wasm_us(mod)
            cand.why = "measured under wasmtime"
        else:
            cand.dense_us, cand.kernel_us = tvm_conv.measure_conv(
                lambda m: build(m, target, tuning), target, lanes, w, shape, ep
            )
            cand.why = "measured"
        return "kernel" if wins(cand.dense_us, cand.kernel_us) else "dense"

    return decide, decide_conv


def lower(
    model: ir.Model,
    out_dir: Path,
    tvm_target: str = "x86",
    tuning: str | None = None,
    decisions: str | None = None,
    sparse: bool = True,
    kernel_everywhere: bool = False,
    executor: str = "auto",
) -> list[Path]:
    """Build ``model`` for ``tvm_target`` into ``out_dir`` (see the module docstring).
    ``kernel_everywhere`` runs every plain 1x1 conv through effc's block kernel, dense ones
    included, and every depthwise and KxK conv through effc's direct kernel (a benchmark baseline:
    the same kernels on dense weights). ``executor`` (x86): ``aot`` effc's executor (static
    shapes only), ``vm`` TVM's relax VM, ``auto`` effc's where the model allows it."""
    t = tvm()
    if executor not in EXECUTORS:
        raise UnsupportedError(f"unknown TVM executor {executor!r}: one of {', '.join(EXECUTORS)}")
    if executor == "aot" and tvm_target == "aarch64":
        raise UnsupportedError("effc's executor builds for x86 and wasm32; aarch64 runs TVM's VM")
    target = target_for(tvm_target)
    files = save_reference(model, out_dir)
    mod = import_onnx(model)
    candidates = []
    if sparse:
        decide, decide_conv = decider(target, tvm_target, tuning, decisions)
        if kernel_everywhere:
            decide = lambda cand, *a: "sparse"  # noqa: E731
            decide_conv = lambda cand, *a: "kernel"  # noqa: E731
        mod, candidates = tvm_sparse.sparsify(
            mod, target, decide, dense=kernel_everywhere, decide_conv=decide_conv
        )
    convs = [c for c in candidates if isinstance(c, tvm_conv.ConvCandidate)]
    pointwise = [c for c in candidates if not isinstance(c, tvm_conv.ConvCandidate)]
    lib = out_dir / LIB_FILE[tvm_target]
    extra = {"executor": "relax-vm"}
    if tvm_target == "wasm32":
        if tuning:
            raise UnsupportedError("a tuning database is for the x86 build, not wasm32")
        extra["aot"] = tvm_aot.write(fused(mod, target), target, out_dir, "wasm32", lib.name)
        extra["executor"] = "effc-aot"
    elif tvm_target == "x86" and executor != "vm":
        try:
            aot = tvm_aot.write(fused(mod, target, tuning), target, out_dir, "x86-lib", AOT_LIB)
            extra.update(aot=aot, executor="effc-aot")
            lib = out_dir / AOT_LIB
        except UnsupportedError as e:
            if executor == "aot":
                raise
            extra["executor_note"] = f"TVM's relax VM, since {e}"
    if extra["executor"] == "relax-vm":
        export(build(mod, target, tuning), lib, tvm_target)
    meta = {
        "tvm_version": t.__version__,
        "tvm_target": tvm_target,
        "target": str(target),
        "inputs": [v.name for v in model.graph.inputs],
        "outputs": [v.name for v in model.graph.outputs],
        "tuning": str(tuning) if tuning else None,
        "sparse_layers": [{k: v for k, v in vars(c).items() if v is not None} for c in pointwise],
        "conv_layers": [{k: v for k, v in vars(c).items() if v is not None} for c in convs],
        **extra,
    }
    (out_dir / META_FILE).write_text(json.dumps(meta, indent=1))
    tvm_sparse.save_decisions(out_dir / DECISIONS_FILE, candidates)
    aot_files = (
        [out_dir / tvm_aot.PLAN_FILE, out_dir / tvm_aot.WEIGHTS_FILE] if "aot" in extra else []
    )
    return [*files, lib, *aot_files, out_dir / META_FILE, out_dir / DECISIONS_FILE]


def _layer_note(layers: list[dict], what: str, chosen_as: str, kernel_us: str) -> str:
    """One report line for a build's candidates of one kind, ``kernel_us`` the key of effc's
    kernel time (not one line per layer: the layers are in decisions.json and tvm.json)."""
    chosen = [c for c in layers if c["choice"] != "dense"]
    line = f"{what}: {len(chosen)} of {len(layers)} candidates {chosen_as}"
    timed = [c for c in layers if "dense_us" in c]
    if timed:
        dense = sum(c["dense_us"] for c in timed)
        fast = sum(c["dense_us" if c["choice"] == "dense" else kernel_us] for c in timed)
        line += (
            f" ({timed[0]['why']}: the candidates take {fast / 1e3:.2f} ms as chosen "
            f"against {dense / 1e3:.2f} ms dense)"
        )
    else:
        line += f" ({layers[0]['why']})"
    return line + f"; per layer in {DECISIONS_FILE}"


def describe(out_dir: Path) -> list[str]:
    """Report notes on what the build chose (read back from tvm.json)."""
    meta = json.loads((Path(out_dir) / META_FILE).read_text())
    notes = [
        f"tvm {meta['tvm_version']} build for {meta['tvm_target']} ({meta['target']})"
        + (f" with tuning database {meta['tuning']}" if meta.get("tuning") else ", untuned")
    ]
    if meta.get("executor") == "effc-aot":
        aot = meta["aot"]
        notes.append(
            f"runs in effc's executor: {aot['steps']} kernel calls, {aot['kernels']} kernels, "
            f"one {aot['arena_bytes'] / 2**20:.1f} MiB arena for all temporaries "
            f"({lib_path(Path(out_dir), meta).name})"
        )
    elif meta.get("executor_note"):
        notes.append(f"runs in {meta['executor_note']}")
    if meta.get("sparse_layers"):
        layers = meta["sparse_layers"]
        notes.append(_layer_note(layers, "block-sparse 1x1 convs", "run sparse", "sparse_us"))
    if meta.get("conv_layers"):
        layers = meta["conv_layers"]
        what = "depthwise and KxK convs"
        notes.append(_layer_note(layers, what, "run by effc's kernel", "kernel_us"))
    return notes


def _host_target() -> str | None:
    return {"x86_64": "x86", "aarch64": "aarch64"}.get(platform.machine())


HOST_SOURCE = Path(__file__).with_name("tvm_host") / "run_vm.cc"
CROSS_CXX = {"aarch64": "aarch64-linux-gnu-g++"}
QEMU = {"aarch64": ("qemu-aarch64", "/usr/aarch64-linux-gnu")}
WHEEL_PLATFORM = {"aarch64": "manylinux_2_28_aarch64"}


def _package_dir(name: str) -> Path:
    import importlib.util

    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise UnsupportedError(f"{name} is not installed: pip install 'effc[tvm]'")
    return Path(spec.submodule_search_locations[0])


def target_runtime(arch: str) -> Path:
    """A folder with the ``arch`` builds of libtvm_runtime.so and libtvm_ffi.so, the versions
    installed here, from PyPI's wheels (downloaded once into the cache folder)."""
    import subprocess
    import sys
    import zipfile
    from importlib.metadata import version

    versions = {"apache-tvm": version("apache-tvm"), "apache-tvm-ffi": version("apache-tvm-ffi")}
    folder = (
        cache_dir() / f"tvm-runtime-{arch}-{versions['apache-tvm']}-{versions['apache-tvm-ffi']}"
    )
    libs = [folder / "libtvm_runtime.so", folder / "libtvm_ffi.so"]
    if all(p.is_file() for p in libs):
        return folder
    wheels = folder / "wheels"
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:"]
    cmd += ["--platform", WHEEL_PLATFORM[arch], "--python-version", "3.11", "-d", str(wheels)]
    cmd += [f"{k}=={v}" for k, v in versions.items()]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["pip failed"])[-1]
        raise UnsupportedError(f"cannot fetch the {arch} TVM runtime wheels from PyPI: {last}")
    for wheel in wheels.glob("*.whl"):
        with zipfile.ZipFile(wheel) as z:
            for name in z.namelist():
                if name in ("tvm/lib/libtvm_runtime.so", "tvm_ffi/lib/libtvm_ffi.so"):
                    (folder / Path(name).name).write_bytes(z.read(name))
    if not all(p.is_file() for p in libs):
        raise UnsupportedError(f"the {arch} wheels lack libtvm_runtime.so / libtvm_ffi.so")
    return folder


def host_program(arch: str) -> Path:
    """effc's TVM host program for ``arch`` (x86: native g++; aarch64: the cross g++), built
    once into the cache folder."""
    import hashlib
    import subprocess

    ffi = _package_dir("tvm_ffi")
    if arch == "x86":
        cxx, libdirs = "g++", [_package_dir("tvm") / "lib", ffi / "lib"]
    else:
        cxx = os.environ.get("EFFC_AARCH64_CXX", CROSS_CXX[arch])
        if not _which(cxx):
            raise UnsupportedError(
                f"running an {arch} artifact needs the cross compiler {cxx}: "
                "apt install g++-aarch64-linux-gnu"
            )
        libdirs = [target_runtime(arch)]
    key = hashlib.sha1(HOST_SOURCE.read_bytes() + str(libdirs).encode()).hexdigest()[:12]
    exe = cache_dir() / f"tvm-host-{arch}-{key}"
    if exe.is_file():
        return exe
    cmd = [cxx, "-std=c++17", "-O2", f"-I{ffi / 'include'}", str(HOST_SOURCE)]
    cmd += ["-Wl,--no-as-needed", "-ltvm_runtime", "-ltvm_ffi", "-o", str(exe) + ".tmp"]
    cmd[5:5] = [f"-L{d}" for d in libdirs] + [f"-Wl,-rpath,{d}" for d in libdirs]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise UnsupportedError(f"building effc's TVM host program failed: {done.stderr[-300:]}")
    os.replace(str(exe) + ".tmp", exe)
    return exe


def run_emulated(out_dir: Path, meta: dict, inputs: dict[str, np.ndarray]) -> dict:
    """Run an aarch64 artifact under qemu with effc's host program (float32 inputs)."""
    import subprocess
    import tempfile

    arch = meta["tvm_target"]
    qemu, sysroot = QEMU[arch]
    if not _which(qemu):
        raise UnsupportedError(
            f"{out_dir} was built for {arch}: run it on an {arch} machine, or here with "
            f"{qemu} (apt install qemu-user g++-aarch64-linux-gnu)"
        )
    exe = host_program(arch)
    runtime = target_runtime(arch)
    with tempfile.TemporaryDirectory(prefix="effc-qemu-") as tmp:
        args = [qemu, str(exe), str(Path(out_dir) / LIB_FILE[arch]), f"{tmp}/out"]
        for i, name in enumerate(meta["inputs"]):
            x = np.asarray(inputs[name], order="C")
            code = _DLPACK_CODES.get(x.dtype.kind)
            if code is None:
                raise UnsupportedError(
                    f"the {arch} host program takes numeric inputs; {name} is {x.dtype}"
                )
            x.tofile(f"{tmp}/in{i}.bin")
            dims = ",".join(str(d) for d in x.shape)
            args += [f"{tmp}/in{i}.bin", f"{code},{x.dtype.itemsize * 8}:{dims}"]
        env = {**os.environ, "QEMU_LD_PREFIX": sysroot, "LD_LIBRARY_PATH": str(runtime)}
        done = subprocess.run(args, capture_output=True, text=True, env=env)
        if done.returncode != 0:
            raise UnsupportedError(f"the {arch} run under {qemu} failed: {done.stderr[-300:]}")
        outs = {}
        for i, name in enumerate(meta["outputs"]):
            dtype, _, dims = Path(f"{tmp}/out{i}.shape").read_text().strip().partition(":")
            code, bits = (int(v) for v in dtype.split(","))
            kind = next(k for k, c in _DLPACK_CODES.items() if c == code)
            shape = [int(d) for d in dims.split(",") if d.strip()]
            kind_dtype = np.dtype(bool) if kind == "b" else np.dtype(f"{kind}{bits // 8}")
            outs[name] = np.fromfile(f"{tmp}/out{i}.bin", kind_dtype).reshape(shape)
        return outs


# numpy dtype kinds and their DLPack type codes (what the host program reads and writes)
_DLPACK_CODES = {"i": 0, "u": 1, "f": 2, "b": 6}


def load(out_dir: Path, threads: int | None = None):
    """(runner, tvm.json) of an artifact built for this machine: the runner is effc's executor
    (``tvm_aot.Native``) or TVM's relax VirtualMachine, as the build chose; ``call`` runs
    either."""
    meta = json.loads((Path(out_dir) / META_FILE).read_text())
    if meta["tvm_target"] != _host_target():
        how = {
            "aarch64": "on an aarch64 machine, or here under qemu-aarch64",
        }.get(meta["tvm_target"], "on its own machine")
        raise UnsupportedError(
            f"{out_dir} was built for {meta['tvm_target']} and this machine is "
            f"{platform.machine()}: run it {how}"
        )
    if threads:
        os.environ["TVM_NUM_THREADS"] = str(threads)
    if meta.get("executor") == "effc-aot":
        return tvm_aot.Native(Path(out_dir), AOT_LIB, meta["aot"]), meta
    t = tvm()
    from tvm import relax

    lib = t.runtime.load_module(str(lib_path(Path(out_dir), meta)))
    return relax.VirtualMachine(lib, t.cpu()), meta


def lib_path(out_dir: Path, meta: dict) -> Path:
    """The compiled file an artifact runs (with weights.bin beside it for effc's executor)."""
    if meta.get("executor") == "effc-aot" and meta["tvm_target"] != "wasm32":
        return out_dir / AOT_LIB
    return out_dir / LIB_FILE[meta["tvm_target"]]


def artifact_bytes(out_dir: Path, meta: dict) -> int:
    """Bytes of what runs: the compiled file, and effc's executor's plan and weights."""
    files = [lib_path(out_dir, meta)]
    if meta.get("executor") == "effc-aot":
        files += [out_dir / tvm_aot.PLAN_FILE, out_dir / tvm_aot.WEIGHTS_FILE]
    return sum(f.stat().st_size for f in files)


def call(vm, meta: dict, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Outputs by name of one run of a loaded artifact (``load``)."""
    if isinstance(vm, tvm_aot.Native):
        return dict(zip(meta["outputs"], vm.run([inputs[name] for name in meta["inputs"]])))
    t = tvm()
    # np.asarray(order="C"), not ascontiguousarray: that makes a 0-d input (Silero's sr) 1-d
    args = [t.runtime.tensor(np.asarray(inputs[name], order="C")) for name in meta["inputs"]]
    out = vm["main"](*args)
    outs = [out] if hasattr(out, "numpy") else list(out)
    return {name: o.numpy() for name, o in zip(meta["outputs"], outs)}


def run(
    out_dir: Path, inputs: dict[str, np.ndarray], threads: int | None = None
) -> dict[str, np.ndarray]:
    meta = json.loads((Path(out_dir) / META_FILE).read_text())
    if meta["tvm_target"] == "wasm32":
        outs, _ = run_wasm(Path(out_dir), meta, inputs)
        return outs
    if meta["tvm_target"] in QEMU and _host_target() != meta["tvm_target"]:
        return run_emulated(Path(out_dir), meta, inputs)
    vm, meta = load(out_dir, threads)
    return call(vm, meta, inputs)


def run_wasm(
    out_dir: Path, meta: dict, inputs: dict[str, np.ndarray], repeat: int = 1
) -> tuple[dict[str, np.ndarray], dict]:
    """Run a wasm32 artifact under wasmtime: (outputs by name, whole-model timing)."""
    xs = [inputs[name] for name in meta["inputs"]]
    outs, timing = tvm_aot.execute(out_dir, meta, xs, LIB_FILE["wasm32"], repeat)
    return dict(zip(meta["outputs"], outs)), timing
