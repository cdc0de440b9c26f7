"""Compile kernels.c with the system C compiler at first use, cached per machine and source.

``library_path()`` returns the shared library for this machine, building it
once: ``gcc -O3 -march=native -fopenmp`` into
``<edgekit cache>/kernels/<sha256 of source, flags, compiler, CPU>/``. The
library is compiled under a temporary name in that folder and renamed into
place, so two processes building at once both end with a complete library.
``build_library(cc=..., flags=..., out=...)`` is the same compile for any
target, e.g. ``aarch64-linux-gnu-gcc -O3 -mcpu=cortex-a55 -fopenmp`` (NEON).
Every function takes ``source`` and ``lib_name`` (default: kernels.c here and
its library name), so another runtime's C file reuses the same machinery.
Nothing is ever downloaded.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from edgekit.errors import StepFailed, UserError

SOURCE = Path(__file__).with_name("kernels.c")
LIB_NAME = "libedgekit_blockffn.so"
# Always on: a shared object, and FMA contraction, which ISO C mode (-std=c11) turns off by default.
BASE_FLAGS = ["-std=c11", "-Wall", "-fPIC", "-shared", "-ffp-contract=fast"]
NATIVE_FLAGS = ["-O3", "-march=native", "-fopenmp"]
TAIL_LINES = 30


def find_compiler(cc: str = "gcc") -> str:
    path = shutil.which(cc)
    if path is None:
        raise UserError(f"the BlockFFN kernels are compiled at first use and {cc} is not installed; "
                        "install gcc (apt-get install gcc)")
    return path


@functools.cache
def compiler_version(cc: str = "gcc") -> str:
    """First line of ``cc --version`` plus the target triple (part of the cache key)."""
    path = find_compiler(cc)
    version = subprocess.run([path, "--version"], capture_output=True, text=True, check=False).stdout
    target = subprocess.run([path, "-dumpmachine"], capture_output=True, text=True, check=False).stdout
    return f"{(version.splitlines() or ['unknown'])[0].strip()} ({target.strip()})"


def _cpu() -> str:
    # -march=native compiles for this CPU: another CPU (same cache folder on a shared disk) needs its own build
    from edgekit.machine import _cpuinfo

    model, flags = _cpuinfo()
    return f"{model} {' '.join(sorted(flags))}"


def cache_key(cc: str = "gcc", flags: list[str] | None = None, source: Path = SOURCE) -> str:
    h = hashlib.sha256()
    for part in (Path(source).read_bytes(), " ".join(BASE_FLAGS + list(NATIVE_FLAGS if flags is None else flags)).encode(),
                 compiler_version(cc).encode(), _cpu().encode()):
        h.update(part)
        h.update(b"\0")
    return h.hexdigest()[:32]


def build_library(cc: str = "gcc", flags: list[str] | None = None, out: str | Path | None = None,
                  source: Path = SOURCE, lib_name: str = LIB_NAME) -> Path:
    """Compile ``source`` (default kernels.c) into the shared library ``out`` (atomically); returns ``out``.

    ``flags`` replaces the default ``-O3 -march=native -fopenmp``; the flags a
    shared library needs are always added. Without ``out`` the library goes to
    the cache folder for this source, compiler, flags and CPU.
    """
    path = find_compiler(cc)
    flags = list(NATIVE_FLAGS if flags is None else flags)
    if out is None:
        out = cached_path(cc, flags, source, lib_name)
    out = Path(out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    except OSError as exc:
        raise UserError(f"cannot write the BlockFFN kernel library to {out.parent} ({exc.strerror}); "
                        "set EDGEKIT_CACHE to a writable folder") from exc
    os.close(fd)
    try:
        proc = subprocess.run([path, *BASE_FLAGS, *flags, str(source), "-o", tmp, "-lm"],
                              capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            tail = "\n".join(proc.stderr.strip().splitlines()[-TAIL_LINES:])
            raise StepFailed(f"{cc} could not compile the native kernels in {source}:\n{tail}")
        os.chmod(tmp, 0o755)
        os.replace(tmp, out)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
    return out


def cached_path(cc: str = "gcc", flags: list[str] | None = None, source: Path = SOURCE, lib_name: str = LIB_NAME) -> Path:
    from edgekit.pipeline import default_cache_dir

    return default_cache_dir() / "kernels" / cache_key(cc, flags, source) / lib_name


def library_path(cc: str = "gcc", source: Path = SOURCE, lib_name: str = LIB_NAME) -> Path:
    """The native library for this machine: reused from the cache, built on first use."""
    out = cached_path(cc, source=source, lib_name=lib_name)
    if out.is_file():
        return out
    return build_library(cc, out=out, source=source, lib_name=lib_name)
