"""The compiled CPU kernels (C++ with AVX2/FMA/F16C, AVX-512 paths chosen at run time, and
OpenMP), built on first use with ``torch.utils.cpp_extension`` into the user cache and loaded
from there afterwards."""

from __future__ import annotations

import functools
import hashlib
import logging
import os
from pathlib import Path

from torch.utils import cpp_extension

from effc.cache import cache_dir
from effc.errors import UnsupportedError

log = logging.getLogger(__name__)
SOURCES = tuple(Path(__file__).with_name(n) for n in ("bsr_kernels.cpp", "decode_ops.cpp"))
INCLUDES = tuple(
    Path(__file__).with_name(n) for n in ("bsr_a8.inc", "bsr_cols.inc")
)  # in SOURCES[0]


@functools.cache
def kernels():
    """Build (about 45 s the first time) or load the extension module."""
    build = cache_dir() / "torch_extensions" / "bsr_cpu"
    build.mkdir(parents=True, exist_ok=True)
    log.info("building/loading the BSR CPU kernels in %s", build)
    # torch rebuilds when the sources or the flags change; the included files go in as a flag
    digest = hashlib.sha256(b"".join(p.read_bytes() for p in INCLUDES)).hexdigest()[:16]
    try:
        return cpp_extension.load(
            name="effc_bsr_cpu",
            sources=[str(p) for p in SOURCES],
            extra_cflags=[
                "-O3",
                "-mavx2",
                "-mfma",
                "-mf16c",
                "-fopenmp",
                "-std=c++17",
                f"-DEFFC_INC={digest}",
            ],
            extra_ldflags=["-fopenmp"],
            build_directory=str(build),
            verbose=os.environ.get("EFFC_VERBOSE_BUILD") == "1",
        )
    except (RuntimeError, OSError) as e:
        raise UnsupportedError(
            f"could not build the BSR CPU kernels (needs g++ and ninja): {e}"
        ) from e
