"""The compiled CPU kernels (C++ with AVX2/FMA/F16C, AVX-512 paths chosen at run time, and
OpenMP), built on first use with ``torch.utils.cpp_extension`` into the user cache and loaded
from there afterwards."""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import logging
import os
import platform
import sys
from pathlib import Path

import torch
from torch.utils import cpp_extension

from effc.cache import cache_dir
from effc.errors import UnsupportedError
from effc.progress import spinner

log = logging.getLogger(__name__)
SOURCES = tuple(Path(__file__).with_name(n) for n in ("bsr_kernels.cpp", "decode_ops.cpp"))
INCLUDES = tuple(
    Path(__file__).with_name(n) for n in ("bsr_a8.inc", "bsr_cols.inc")
)  # in SOURCES[0]


FLAGS = ["-O3", "-mavx2", "-mfma", "-mf16c", "-fopenmp", "-std=c++17"]


def cpu_features() -> str:
    """The CPU's SIMD feature flags (what the kernels dispatch on), from /proc/cpuinfo."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                return " ".join(sorted(f for f in flags if f.startswith(("avx", "fma", "f16c"))))
    except OSError:
        pass
    return platform.machine()


def build_key() -> str:
    """One build per (sources, flags, torch and Python version, CPU features): environments with
    other torch builds, and machines with other CPUs, never evict each other's build."""
    h = hashlib.sha256()
    for part in (
        *[p.read_bytes() for p in (*SOURCES, *INCLUDES)],
        " ".join(FLAGS).encode(),
        torch.__version__.encode(),
        sys.version.encode(),
        cpu_features().encode(),
    ):
        h.update(part)
    return h.hexdigest()[:16]


@contextlib.contextmanager
def _build_lock(build: Path):
    """Hold an exclusive ``flock`` on the build folder while torch builds or loads there.

    torch guards a build with a lock *file* that the builder deletes when done; a build that was
    killed (Ctrl-C, a CI timeout) leaves it, and every later process waits for it forever. The
    kernel drops an ``flock`` when its holder dies, so with ours held no other effc process is
    building here, and a torch lock file found now is stale: it is removed."""
    with open(build / "effc.lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        stale = build / "lock"
        if stale.exists():
            log.warning("removing a stale build lock left by a killed build: %s", stale)
            stale.unlink(missing_ok=True)
        yield


@functools.cache
def kernels():
    """Build (about a minute, the first time on a machine and environment; a spinner shows it)
    or load the extension module."""
    key = build_key()
    build = cache_dir() / "torch_extensions" / f"bsr_cpu-{key}"
    fresh = not any(build.glob("*.so"))
    build.mkdir(parents=True, exist_ok=True)
    log.info("building/loading the BSR CPU kernels in %s", build)
    try:
        building = "building effc's BSR CPU kernels (once per machine and environment)"
        with _build_lock(build), spinner(building)[0] if fresh else contextlib.nullcontext():
            return cpp_extension.load(
                name=f"effc_bsr_cpu_{key}",
                sources=[str(p) for p in SOURCES],
                extra_cflags=[*FLAGS, f"-DEFFC_INC={key}"],
                extra_ldflags=["-fopenmp"],
                build_directory=str(build),
                verbose=os.environ.get("EFFC_VERBOSE_BUILD") == "1",
            )
    except (RuntimeError, OSError) as e:
        raise UnsupportedError(
            f"could not build the BSR CPU kernels (needs g++ and ninja): {e}"
        ) from e
