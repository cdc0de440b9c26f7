"""C-simulation of a generated HLS project with g++, checked against the integer reference.

``run_csim(project_dir, graph, images)`` writes ``tb_data/`` (each image and the
reference's outputs, from ``fpga/reference.py``), compiles the testbench and
the firmware once with g++ (the Apache-2.0 ap_int headers from the hls4ml
wheel; ``-fsanitize=address,undefined`` unless ``sanitize=False``), runs it on
all images in one process and parses its summary line. The binary is cached
in ``csim_build/`` by a hash of the sources and flags, so checking more images
does not recompile.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from edgekit.fpga.ir import Graph

from edgekit.errors import StepFailed, UserError
from edgekit.fsio import write_bytes, write_text

SUMMARY = re.compile(r"EDGEKIT_CSIM images=(\d+) values=(\d+) mismatches=(\d+)")
# g++ does not know the #pragma HLS lines (and cannot be told so from inside a file, GCC bug 53431).
BASE_FLAGS = ["-std=c++14", "-Wall", "-Wextra", "-Wno-unknown-pragmas", "-DEDGEKIT_CSIM"]
# ap_private sign-extends with a left shift of negative int64 values (defined since C++20; its
# authors exempt it from UBSan for clang only), so the shift-base check is off; all others stay.
SANITIZE_FLAGS = ["-g1", "-fsanitize=address,undefined", "-fno-sanitize=shift-base", "-fno-sanitize-recover=undefined",
                  "-fno-omit-frame-pointer"]
TAIL_LINES = 20


@dataclass
class CsimResult:
    images: int
    values: int  # output values compared
    mismatches: int
    compile_seconds: float  # 0 when the cached binary was reused
    run_seconds: float
    stdout_tail: str
    returncode: int
    binary: Path
    compiler_stderr: str = ""  # g++'s warnings (empty when the cached binary was reused)

    @property
    def passed(self) -> bool:
        return self.returncode == 0 and self.mismatches == 0 and self.values > 0

    def summary(self) -> dict:
        return {"images": self.images, "values": self.values, "mismatches": self.mismatches,
                "compile_seconds": round(self.compile_seconds, 2), "run_seconds": round(self.run_seconds, 2)}


def ap_types_dir() -> Path:
    """The ap_int / ap_fixed headers shipped in the hls4ml wheel (Apache-2.0)."""
    try:
        import hls4ml
    except ImportError as exc:
        raise UserError("the C-simulation needs the ap_int headers from hls4ml; install them with `pip install edgekit[fpga]`") from exc
    folder = Path(hls4ml.__file__).parent / "templates" / "vivado" / "ap_types"
    if not (folder / "ap_int.h").is_file():
        raise UserError(f"hls4ml is installed but {folder} has no ap_int.h; reinstall it with `pip install --force-reinstall edgekit[fpga]`")
    return folder


def compiler() -> str:
    gxx = shutil.which("g++")
    if gxx is None:
        raise UserError("the C-simulation needs g++; install it (Debian/Ubuntu: `apt-get install g++`)")
    return gxx


def _manifest(project: Path) -> dict:
    path = project / "project.json"
    if not path.is_file():
        raise UserError(f"{project} is not an edgekit HLS project (no project.json); write it with edgekit.fpga.hls.write_project")
    return json.loads(path.read_text())


def write_tb_data(project_dir: str | Path, graph: Graph, images: Iterable[np.ndarray] | np.ndarray) -> int:
    """Write tb_data/input_<i>.bin and expected_<i>.bin from the reference; return the image count."""
    from edgekit.fpga.reference import run_graph

    project = Path(project_dir)
    manifest = _manifest(project)
    shape = tuple(manifest["input"]["shape"])
    if [o["name"] for o in manifest["outputs"]] != list(graph.outputs):
        raise UserError(f"{project} was generated for outputs {[o['name'] for o in manifest['outputs']]}, not this graph's {graph.outputs}; regenerate it")
    data = project / "tb_data"
    data.mkdir(parents=True, exist_ok=True)
    for old in list(data.glob("input_*.bin")) + list(data.glob("expected_*.bin")):
        old.unlink()
    count = 0
    for n, image in enumerate(images):
        image = np.asarray(image)
        if tuple(image.shape) != shape:
            raise UserError(f"image {n} has shape {tuple(image.shape)}; the project's input is {shape} (uint8 CHW)")
        if image.dtype != np.uint8:
            if not np.issubdtype(image.dtype, np.integer) or image.min() < 0 or image.max() > 255:
                raise UserError(f"image {n} must be uint8 CHW (integers in [0, 255]), got {image.dtype}")
            image = image.astype(np.uint8)
        env = run_graph(graph, image)
        parts = []
        for name in graph.outputs:
            value = env[name]
            if value.min(initial=0) < -(2**31) or value.max(initial=0) >= 2**31:
                raise UserError(f"reference output {name} of image {n} overflows int32; the hardware accumulator would wrap")
            parts.append(value.astype("<i4").reshape(-1))
        write_bytes(data / f"input_{n}.bin", np.ascontiguousarray(image).tobytes())
        write_bytes(data / f"expected_{n}.bin", np.concatenate(parts).tobytes())
        count += 1
    if count == 0:
        raise UserError("run_csim needs at least one image")
    return count


def compile_testbench(project_dir: str | Path, *, sanitize: bool = True, optimize: bool = True) -> tuple[Path, float, str]:
    """Build (or reuse) the csim binary; returns (binary, seconds spent compiling, compiler stderr).

    The testbench and the firmware compile in parallel; ``optimize=False`` (-O0)
    halves the compile time of a sanitized build and slows the run about tenfold.
    """
    project = Path(project_dir)
    manifest = _manifest(project)
    sources = [project / manifest["testbench"], *(project / s for s in manifest["sources"])]
    flags = [*BASE_FLAGS, "-O1" if optimize else "-O0", *(SANITIZE_FLAGS if sanitize else [])]
    include = ap_types_dir()
    gxx = compiler()
    digest = hashlib.sha256(" ".join([gxx, *flags, str(include)]).encode())
    for path in sorted((project / "firmware").rglob("*.h")) + sources:
        digest.update(path.read_bytes())
    build = project / "csim_build"
    binary = build / ("csim" + ("_asan" if sanitize else "") + ("" if optimize else "_O0"))
    stamp = binary.with_suffix(".sha256")
    if binary.is_file() and stamp.is_file() and stamp.read_text() == digest.hexdigest():
        return binary, 0.0, ""
    build.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    objects = [build / f"{src.stem}{binary.name[4:]}.o" for src in sources]
    jobs = [subprocess.Popen([gxx, *flags, "-isystem", str(include), "-c", str(src), "-o", str(obj)], cwd=project,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for src, obj in zip(sources, objects)]
    errors = []
    for job in jobs:
        _, err = job.communicate()
        errors.append(err)
    stderr = "".join(errors)
    if any(job.returncode for job in jobs):
        raise StepFailed(f"g++ could not compile the C-simulation of {project}:\n{_tail(stderr)}")
    link = subprocess.run([gxx, *flags, *map(str, objects), "-o", str(binary)], cwd=project, capture_output=True, text=True, check=False)
    stderr += link.stderr
    if link.returncode != 0:
        raise StepFailed(f"g++ could not link the C-simulation of {project}:\n{_tail(link.stderr)}")
    write_text(stamp, digest.hexdigest())
    return binary, time.perf_counter() - started, stderr


def run_testbench(project_dir: str | Path, binary: Path, images: int) -> tuple[subprocess.CompletedProcess, float]:
    env = {**os.environ, "ASAN_OPTIONS": "detect_leaks=0:abort_on_error=0", "UBSAN_OPTIONS": "print_stacktrace=1:halt_on_error=1"}
    started = time.perf_counter()
    proc = subprocess.run([str(binary), str(images), "tb_data"], cwd=project_dir, capture_output=True, text=True, check=False, env=env)
    return proc, time.perf_counter() - started


def parse_summary(stdout: str) -> tuple[int, int, int] | None:
    found = SUMMARY.findall(stdout)
    return tuple(map(int, found[-1])) if found else None  # type: ignore[return-value]


def run_csim(project_dir: str | Path, graph: Graph, images_uint8: Iterable[np.ndarray] | np.ndarray, *,
             sanitize: bool = True, optimize: bool = True) -> CsimResult:
    """Compare the generated C++ with the reference on ``images_uint8`` (CHW uint8 each).

    Returns the counts; mismatches are reported, not raised (the caller
    decides). A testbench that crashes or prints no summary raises StepFailed.
    """
    project = Path(project_dir)
    count = write_tb_data(project, graph, images_uint8)
    binary, compile_seconds, stderr = compile_testbench(project, sanitize=sanitize, optimize=optimize)
    proc, run_seconds = run_testbench(project, binary, count)
    parsed = parse_summary(proc.stdout)
    if parsed is None or proc.returncode not in (0, 1):
        raise StepFailed(f"the C-simulation of {project} failed (exit code {proc.returncode}):\n"
                         f"{_tail(proc.stdout)}\n{_tail(proc.stderr)}")
    done, values, mismatches = parsed
    return CsimResult(done, values, mismatches, compile_seconds, run_seconds, _tail(proc.stdout), proc.returncode, binary, stderr)


def _tail(text: str, lines: int = TAIL_LINES) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])
