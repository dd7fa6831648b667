"""effc's ahead-of-time executor for the tvm target: a plan of TVM's compiled kernels run by
effc's own small executor (``tvm_host/run_aot.c``) instead of TVM's relax VM. It is how wasm32
artifacts run, and how x86 artifacts of static-shape models run by default.

TVM's web runtime (``wasm_runtime.cc``) needs emscripten and tvm-ffi sources the PyPI wheel does
not ship, so a relax VM executable cannot run as WebAssembly here. A static-shape model does not
need a VM: after legalization and fusion (``tvm.fused``) its ``main`` is a straight sequence of
``call_tir`` kernel calls on constants, inputs and earlier results (reshapes are views). effc:

1. walks that sequence into a plan (``plan.txt``): one storage per tensor (constants at 64-byte
   aligned offsets of ``weights.bin``; temporaries at offsets of one arena, shared by tensors
   whose lifetimes do not overlap), one view (dtype, shape) per value, one step per kernel call;
2. compiles the kernels alone with TVM's llvm codegen for the target (wasm32 with SIMD128, x86
   with the CPU's AVX-512/AVX2) into one object, each under a C name (``effc_k<i>``), and a
   table of their entry points;
3. links the executor, the table and the object: for wasm32 with clang and the WASI libc into
   ``model.wasm``, a WASI command module (``model.wasm /a /io [REPEAT]``, the artifact folder
   preopened as ``/a``, a folder of ``in<i>.bin`` / ``out<i>.bin`` as ``/io``), run under
   wasmtime (PyPI ``wasmtime``) in process; for x86 with the system C compiler into a shared
   library (``Native``, called through ctypes, parallel loops on effc's thread pool), or into
   the same command natively (a check of the executor without WebAssembly in the way).

Compared with TVM's VM the executor saves the VM's per-instruction dispatch and per-call
allocation (one arena, allocated once) and the copies of legalized reshapes (views here).
Anything outside the sequence (control flow, symbolic shapes, packed-function calls) is refused
with a one-line error; the x86 build then falls back to the VM.
"""

from __future__ import annotations

import atexit
import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from effc.errors import UnsupportedError

EXECUTOR = Path(__file__).with_name("tvm_host") / "run_aot.c"
PLAN_FILE = "plan.txt"
WEIGHTS_FILE = "weights.bin"
WASM_SYSROOT = Path(os.environ.get("EFFC_WASI_SYSROOT", "/usr"))
DTYPES = {"float32": (2, 32), "float16": (2, 16), "int32": (0, 32), "int64": (0, 64)}
DTYPES.update({"int8": (0, 8), "uint8": (1, 8), "bool": (6, 8)})  # DLPack codes


@dataclass
class Plan:
    storages: list[tuple[int, str, int]] = field(default_factory=list)  # (bytes, kind, where)
    views: list[tuple[int, str, tuple[int, ...]]] = field(default_factory=list)
    steps: list[tuple[int, list[int]]] = field(default_factory=list)  # (kernel, views)
    inputs: list[int] = field(default_factory=list)
    outputs: list[int] = field(default_factory=list)
    kernels: list[str] = field(default_factory=list)  # relax GlobalVar names, by index
    weights: bytearray = field(default_factory=bytearray)
    arena: int = 0  # bytes of the one buffer all temporaries share

    def text(self) -> str:
        head = f"effc-aot 2 weights {len(self.weights)} arena {self.arena}"
        lines = [f"{head} storages {len(self.storages)}"]
        lines += [f"{n} {k} {w}" for n, k, w in self.storages]
        lines.append(f"views {len(self.views)}")
        for s, dtype, shape in self.views:
            code, bits = DTYPES[dtype]
            lines.append(" ".join(map(str, [s, code, bits, len(shape), *shape])))
        lines.append(f"steps {len(self.steps)}")
        for k, args in self.steps:
            lines.append(" ".join(map(str, [k, len(args), *args])))
        lines.append(" ".join(map(str, ["inputs", len(self.inputs), *self.inputs])))
        lines.append(" ".join(map(str, ["outputs", len(self.outputs), *self.outputs])))
        return "\n".join(lines) + "\n"


def _tensor_info(ty) -> tuple[str, tuple[int, ...]]:
    from tvm import relax

    if not isinstance(ty, relax.TensorType) or ty.shape is None:
        raise UnsupportedError(f"effc's executor needs static tensors, got {ty}")
    try:
        shape = tuple(int(d) for d in ty.shape.values)
    except (TypeError, AttributeError) as e:
        raise UnsupportedError(f"effc's executor needs static shapes, got {ty}") from e
    dtype = str(ty.dtype)
    if dtype not in DTYPES:
        raise UnsupportedError(f"effc's executor has no dtype {dtype}")
    return dtype, shape


def plan(mod) -> tuple[Plan, object]:
    """The plan of a fused relax module's ``main`` and the IRModule of the kernels it calls."""
    import tvm
    from tvm import relax

    # a kernel that only copies (a legalized reshape) becomes a view, as in TVM's VM build
    mod = relax.transform.RewriteDataflowReshape()(mod)
    main = mod["main"]
    call_tir = tvm.ir.Op.get("relax.call_tir")
    reshape = tvm.ir.Op.get("relax.reshape")
    p = Plan()
    value_of: dict = {}  # relax Var -> view index
    kernels: dict[str, int] = {}

    def storage(nbytes: int, kind: str, where: int = -1) -> int:
        p.storages.append((nbytes, kind, where))
        return len(p.storages) - 1

    def view(s: int, dtype: str, shape) -> int:
        p.views.append((s, dtype, tuple(shape)))
        return len(p.views) - 1

    def nbytes(dtype: str, shape) -> int:
        return int(np.prod(shape, dtype=np.int64)) * max(1, DTYPES[dtype][1] // 8)

    def constant(c) -> int:
        dtype, shape = _tensor_info(c.ty)  # the declared shape (a scalar may hold (1,))
        arr = np.ascontiguousarray(c.value.numpy(), dtype).reshape(shape)
        offset = (len(p.weights) + 63) // 64 * 64
        p.weights.extend(b"\0" * (offset - len(p.weights)))
        p.weights.extend(arr.tobytes())
        return view(storage(arr.nbytes, "c", offset), dtype, shape)

    def arg(e) -> int:
        if isinstance(e, tvm.ir.expr.Constant):
            return constant(e)
        if isinstance(e, relax.Var) and isinstance(value_of.get(e), int):
            return value_of[e]
        raise UnsupportedError(f"effc's executor cannot pass {type(e).__name__} to a kernel")

    def fields(e) -> list[int]:
        """The views of a tuple (a Tuple expression or a Var bound to one), or of one tensor."""
        if isinstance(e, relax.Tuple):
            return [arg(f) for f in e.fields]
        if isinstance(e, relax.Var) and isinstance(value_of.get(e), list):
            return value_of[e]
        return [arg(e)]

    for i, param in enumerate(main.params):
        dtype, shape = _tensor_info(param.ty)
        value_of[param] = view(storage(nbytes(dtype, shape), "i", i), dtype, shape)
        p.inputs.append(value_of[param])
    body = main.body
    for block in body.blocks:
        for binding in block.bindings:
            if not isinstance(binding, relax.VarBinding):
                raise UnsupportedError("effc's executor cannot run match_cast bindings")
            var, value = binding.var, binding.value
            if isinstance(value, relax.Var):
                value_of[var] = value_of[value]
            elif isinstance(value, relax.Call) and value.op == reshape:
                src = arg(value.args[0])
                dtype, shape = _tensor_info(var.ty)
                value_of[var] = view(p.views[src][0], dtype, shape)
            elif isinstance(value, relax.Call) and value.op == call_tir:
                gv = value.args[0]
                if len(value.args) > 2:
                    raise UnsupportedError(
                        f"effc's executor cannot pass symbolic values to {gv.name_hint}"
                    )
                ins = [arg(a) for a in value.args[1].fields]
                # a kernel writing several tensors (Split) returns a tuple: one view each
                types = list(var.ty.fields) if isinstance(var.ty, relax.TupleType) else [var.ty]
                outs = []
                for ty in types:
                    dtype, shape = _tensor_info(ty)
                    outs.append(view(storage(nbytes(dtype, shape), "t"), dtype, shape))
                value_of[var] = outs if isinstance(var.ty, relax.TupleType) else outs[0]
                k = kernels.setdefault(gv.name_hint, len(kernels))
                p.steps.append((k, [*ins, *outs]))
            elif isinstance(value, relax.Tuple):
                value_of[var] = [arg(f) for f in value.fields]
            elif isinstance(value, relax.TupleGetItem):
                value_of[var] = fields(value.tuple_value)[value.index]
            else:
                what = value.op.name if isinstance(value, relax.Call) else type(value).__name__
                raise UnsupportedError(f"effc's executor cannot run {what} (only kernels)")
    p.outputs = fields(body.body)
    for i, v in enumerate(p.outputs):  # outputs live from their first write to the end
        n, kind, _ = p.storages[p.views[v][0]]
        if kind != "t":
            raise UnsupportedError("effc's executor needs each output computed by a kernel, once")
        p.storages[p.views[v][0]] = (n, "o", i)
    p.arena = _place_temporaries(p)
    p.kernels = sorted(kernels, key=kernels.get)
    prims = {}
    for name in p.kernels:
        func = mod[name]
        if not isinstance(func, tvm.tirx.PrimFunc):
            raise UnsupportedError(f"effc's executor can only call TensorIR kernels ({name})")
        symbol = f"effc_k{kernels[name]}"
        prims[symbol] = func.with_attr("global_symbol", symbol)
    return p, tvm.IRModule(prims)


def _place_temporaries(p: Plan) -> int:
    """Give each temporary an offset in one arena, where tensors whose lifetimes (first write to
    last use, in steps) overlap never share bytes: greedy by size, largest first, each at the
    lowest 64-byte aligned offset that fits (TFLite's and TVM's static planners do the same).
    Returns the arena's size."""
    first: dict[int, int] = {}
    last: dict[int, int] = {}
    for i, (_, args) in enumerate(p.steps):
        for v in args:
            s = p.views[v][0]
            first.setdefault(s, i)
            last[s] = i
    temps = [s for s, (_, kind, _) in enumerate(p.storages) if kind == "t" and s in first]
    temps.sort(key=lambda s: (-p.storages[s][0], s))
    placed: list[tuple[int, int, int, int]] = []  # (offset, end, first, last)
    size = 0
    for s in temps:
        n = (p.storages[s][0] + 63) // 64 * 64
        live = sorted(
            (o, e) for o, e, f, la in placed if f <= last[s] and first[s] <= la
        )  # those alive at the same time
        offset = 0
        for o, e in live:
            if offset + n <= o:
                break
            offset = max(offset, e)
        placed.append((offset, offset + n, first[s], last[s]))
        p.storages[s] = (p.storages[s][0], "t", offset)
        size = max(size, offset + n)
    return size


WASM_TOOLS = "apt install clang lld wasi-libc libclang-rt-14-dev-wasm32"


def _tool(*names: str, what: str = "a wasm32 artifact", how: str = WASM_TOOLS) -> str:
    for name in names:
        if shutil.which(name):
            return name
    raise UnsupportedError(f"building {what} needs {names[0]}: {how}")


def _run(cmd: list[str], what: str) -> None:
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise UnsupportedError(f"{what} failed: {done.stderr.strip()[-400:]}")


def _ffi_include() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("tvm_ffi")
    if spec is None or not spec.submodule_search_locations:
        raise UnsupportedError("effc's executor needs tvm-ffi's headers: pip install 'effc[tvm]'")
    return Path(spec.submodule_search_locations[0]) / "include"


def link(p: Plan, kernels, target, out: Path, arch: str) -> None:
    """Compile the kernels for ``target`` and link them with the executor into ``out``:
    ``arch`` wasm32 a WASI command, x86 a native command (the same main, a check without
    WebAssembly), x86-lib a shared library for ``Native`` (in process)."""
    import tvm

    lib = tvm.compile(kernels, target=target)
    with tempfile.TemporaryDirectory(prefix="effc-aot-") as tmp:
        obj = Path(tmp) / "kernels.o"
        lib.mod.write_to_file(str(obj))
        table = Path(tmp) / "kernels.c"
        names = [f"effc_k{i}" for i in range(len(p.kernels))]
        table.write_text(
            "#include <stdint.h>\n"
            "typedef int (*Kernel)(void*, const void*, int32_t, void*);\n"
            + "".join(
                f"extern int __tvm_ffi_{n}(void*, const void*, int32_t, void*);\n" for n in names
            )
            + f"const int effc_num_kernels = {len(names)};\n"
            + "const Kernel effc_kernels[] = {"
            + ", ".join(f"__tvm_ffi_{n}" for n in names)
            + "};\n"
        )
        flags = ["-O2", f"-I{_ffi_include()}", str(EXECUTOR), str(table), str(obj), "-lm"]
        if arch == "wasm32":
            cc = _tool("clang")
            _tool("wasm-ld")
            cmd = [cc, "--target=wasm32-wasi", f"--sysroot={WASM_SYSROOT}", "-msimd128"]
            cmd += ["-Wl,-z,stack-size=8388608", *flags, "-o", str(out)]
        else:
            cc = _tool("cc", "gcc", "clang", what="the native executor", how="install a C compiler")
            cmd = [cc, *flags, "-pthread", "-o", str(out)]
            if arch == "x86-lib":
                cmd[1:1] = [
                    "-shared",
                    "-fPIC",
                    "-DEFFC_AOT_LIBRARY",
                    "-Wl,-z,noexecstack,-z,defs,-Bsymbolic",
                ]
        _run(cmd, f"linking the {arch} executor")


def write(mod, target, out_dir: Path, arch: str, lib_name: str) -> dict:
    """Plan ``mod`` (a fused relax module), write plan.txt and weights.bin and link
    ``lib_name`` (see ``link`` for ``arch``); returns the manifest entries (kernels, steps,
    bytes)."""
    p, kernels = plan(mod)
    (out_dir / PLAN_FILE).write_text(p.text())
    (out_dir / WEIGHTS_FILE).write_bytes(bytes(p.weights))
    link(p, kernels, target, out_dir / lib_name, arch)
    return {
        "executor": "effc-aot",
        "kernels": len(p.kernels),
        "kernel_names": p.kernels,
        "steps": len(p.steps),
        "weight_bytes": len(p.weights),
        "arena_bytes": p.arena,
        "input_shapes": [list(p.views[v][2]) for v in p.inputs],
        "input_dtypes": [p.views[v][1] for v in p.inputs],
        "output_shapes": [list(p.views[v][2]) for v in p.outputs],
        "output_dtypes": [p.views[v][1] for v in p.outputs],
    }


def _check_inputs(aot: dict, inputs: list[np.ndarray]) -> list[np.ndarray]:
    if len(inputs) != len(aot["input_shapes"]):
        raise UnsupportedError(f"the model takes {len(aot['input_shapes'])} inputs")
    xs = []
    for i, (x, shape, dtype) in enumerate(zip(inputs, aot["input_shapes"], aot["input_dtypes"])):
        x = np.asarray(x, order="C")  # (ascontiguousarray makes a 0-d input 1-d)
        if list(x.shape) != shape or str(x.dtype) != dtype:
            raise UnsupportedError(
                f"input {i} must be {dtype} {tuple(shape)}, got {x.dtype} {x.shape}"
            )
        xs.append(x)
    return xs


class Native:
    """An x86 artifact's executor library (``link`` arch x86-lib) loaded in this process:
    ``run`` copies the inputs in, runs the planned kernels on its thread pool
    (TVM_NUM_THREADS, read at the first run of the process) and returns the outputs."""

    def __init__(self, out_dir: Path, lib_name: str, aot: dict):
        import ctypes

        self.aot = aot
        try:
            lib = ctypes.CDLL(str(Path(out_dir).resolve() / lib_name))
        except OSError as e:
            raise UnsupportedError(f"cannot load {Path(out_dir) / lib_name}: {e}") from e
        lib.effc_aot_open.restype = ctypes.c_void_p
        lib.effc_aot_open.argtypes = [ctypes.c_char_p]
        lib.effc_aot_error.restype = ctypes.c_char_p
        lib.effc_aot_run.argtypes = [ctypes.c_void_p] * 4
        lib.effc_aot_close.argtypes = [ctypes.c_void_p]
        self._lib, self._c = lib, ctypes
        self._handle = lib.effc_aot_open(str(Path(out_dir).resolve()).encode())
        if not self._handle:
            raise UnsupportedError(f"effc's executor: {lib.effc_aot_error().decode()}")

    def _pointers(self, arrays: list[np.ndarray]):
        return (self._c.c_void_p * max(1, len(arrays)))(*[a.ctypes.data for a in arrays])

    def run(self, inputs: list[np.ndarray], step_ns: np.ndarray | None = None) -> list:
        """Outputs (new arrays) of one run; ``step_ns`` (int64, one per step) accumulates each
        step's time when given."""
        xs = _check_inputs(self.aot, inputs)
        if step_ns is not None and (step_ns.dtype != np.int64 or step_ns.size < self.aot["steps"]):
            raise ValueError("step_ns must be int64 with one entry per step")
        prof = None if step_ns is None else step_ns.ctypes.data
        outs = [  # the executor copies each output straight into these
            np.empty(shape, dtype)
            for shape, dtype in zip(self.aot["output_shapes"], self.aot["output_dtypes"])
        ]
        rc = self._lib.effc_aot_run(self._handle, self._pointers(xs), self._pointers(outs), prof)
        if rc != 0:
            raise UnsupportedError(f"effc's executor: {self._lib.effc_aot_error().decode()}")
        return outs

    def close(self) -> None:
        if getattr(self, "_handle", None):
            self._lib.effc_aot_close(self._handle)
            self._handle = None

    __del__ = close


def can_run_wasm() -> bool:
    """Whether wasm32 modules can be linked and run here (clang, wasm-ld, WASI libc, wasmtime)."""
    import importlib.util

    return (
        all(shutil.which(t) for t in ("clang", "wasm-ld"))
        and (WASM_SYSROOT / "lib" / "wasm32-wasi" / "libc.a").is_file()
        and importlib.util.find_spec("wasmtime") is not None
    )


def _wasmtime():
    try:
        import wasmtime
    except ImportError as e:
        raise UnsupportedError(
            "running a wasm32 artifact needs a WebAssembly runtime: pip install wasmtime"
        ) from e
    return wasmtime


_MODULES: dict = {}
atexit.register(_MODULES.clear)  # before wasmtime's own teardown


def execute(
    out_dir: Path,
    meta: dict,
    inputs: list[np.ndarray],
    lib_name: str,
    repeat: int = 1,
    via: list[str] | None = None,
) -> tuple[list[np.ndarray], dict]:
    """Run the artifact's executor on ``inputs`` (in plan order); (outputs, timing) where
    timing has the median and fastest whole-model run in ms over ``repeat`` runs. A wasm32
    module runs under wasmtime in process, unless ``via`` names another host command
    (``via + [module, artifact dir, io dir, repeat]``, e.g. node's WASI); a native command
    runs as it is."""
    out_dir = Path(out_dir).resolve()
    aot = meta["aot"]
    xs = _check_inputs(aot, inputs)
    with tempfile.TemporaryDirectory(prefix="effc-aot-io-") as io:
        for i, x in enumerate(xs):
            x.tofile(f"{io}/in{i}.bin")
        log = Path(io) / "stdout.txt"
        err = Path(io) / "stderr.txt"
        if meta["tvm_target"] == "wasm32" and via is None:
            code = _run_wasm(out_dir / lib_name, out_dir, Path(io), repeat, log, err)
        else:
            with open(log, "w") as so, open(err, "w") as se:
                cmd = [*(via or []), str(out_dir / lib_name), str(out_dir), io, str(repeat)]
                code = subprocess.run(cmd, stdout=so, stderr=se).returncode
        if code != 0:
            raise UnsupportedError(
                f"the {meta['tvm_target']} executor failed: {err.read_text()[-300:]}"
            )
        m = re.search(r"median_ns=(\d+) min_ns=(\d+)", log.read_text())
        timing = {"median_ms": int(m[1]) / 1e6, "min_ms": int(m[2]) / 1e6, "runs": repeat}
        outs = [
            np.fromfile(f"{io}/out{i}.bin", dtype).reshape(shape)
            for i, (shape, dtype) in enumerate(zip(aot["output_shapes"], aot["output_dtypes"]))
        ]
    return outs, timing


def _run_wasm(wasm: Path, art: Path, io: Path, repeat: int, log: Path, err: Path) -> int:
    wt = _wasmtime()
    key = (str(wasm), wasm.stat().st_mtime_ns)
    if key not in _MODULES:  # compiling the module (cranelift) is the slow part: once a process
        engine = wt.Engine()
        _MODULES.clear()
        _MODULES[key] = (engine, wt.Module.from_file(engine, str(wasm)))
    engine, module = _MODULES[key]
    store = wt.Store(engine)
    wasi = wt.WasiConfig()
    wasi.argv = ["model.wasm", "/a", "/io", str(repeat)]
    wasi.preopen_dir(str(art), "/a")
    wasi.preopen_dir(str(io), "/io")
    wasi.stdout_file = str(log)
    wasi.stderr_file = str(err)
    store.set_wasi(wasi)
    linker = wt.Linker(engine)
    linker.define_wasi()
    instance = linker.instantiate(store, module)
    try:
        instance.exports(store)["_start"](store)
    except wt.ExitTrap as e:
        return e.code
    except wt.Trap as e:
        err.write_text(f"trap: {str(e).splitlines()[0]}")
        return 1
    return 0


def time_module(mod, target, arch: str, repeat: int = 20) -> float:
    """Median ms of a fused relax module run ``repeat`` times by the executor for ``arch`` on
    random inputs: how a wasm32 build measures a layer's dense and sparse forms in the
    WebAssembly runtime it will run in."""
    with tempfile.TemporaryDirectory(prefix="effc-aot-time-") as tmp:
        name = "model.wasm" if arch == "wasm32" else "model.bin"
        aot = write(mod, target, Path(tmp), arch, name)
        rng = np.random.default_rng(0)
        xs = [
            rng.standard_normal(shape).astype(dtype)
            for shape, dtype in zip(aot["input_shapes"], aot["input_dtypes"])
        ]
        _, timing = execute(Path(tmp), {"tvm_target": arch, "aot": aot}, xs, name, repeat)
    return timing["median_ms"]
