"""Apache TVM adapter: runs the host library of a ``tvm`` artifact on the Relax VM.

A TVM library has fixed input shapes (those in the artifact's specs). A
library cross-compiled for another architecture (aarch64, armv7) cannot be
loaded here; it runs on the device. TVM's thread pool reads
``TVM_NUM_THREADS`` once, when it first starts: the adapter sizes it to all
cores before that and gives each session its share with
``runtime.config_threadpool``.
"""

from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Any

import numpy as np

from edgekit.artifact import Artifact
from edgekit.errors import UserError
from edgekit.runtimes.base import Runtime, Session

# ELF e_machine values and the names readelf prints for them
_ELF_MACHINES = {3: "x86", 40: "ARM", 62: "x86-64", 183: "AArch64"}
_HOST_MACHINES = {"x86_64": 62, "amd64": 62, "aarch64": 183, "arm64": 183, "i386": 3, "i686": 3, "armv7l": 40, "armv8l": 40}


class TvmSession(Session):
    def __init__(self, vm, specs, order: list[str], output_names: list[str], info: dict[str, Any], threads: int | None):
        self._vm = vm
        self._main = vm["main"]
        self._specs = {s.name: s for s in specs}
        self._order = order
        self.input_names = list(order)
        self.output_names = list(output_names)
        self._info = info
        self._threads = threads

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        import tvm

        missing = [n for n in self._order if n not in feeds]
        if missing:
            raise UserError(f"inputs {', '.join(missing)} are missing; the model takes {', '.join(self._order)}")
        _use_threads(self._threads)
        args = []
        for name in self._order:
            spec = self._specs.get(name)
            arr = np.asarray(feeds[name])
            if spec is not None:
                arr = arr.astype(spec.dtype, copy=False)
                want = [int(d) if isinstance(d, int) else d for d in spec.shape]
                if list(arr.shape) != want:
                    raise UserError(
                        f"input {name} has shape {list(arr.shape)} but the TVM library was built for {want} "
                        "(TVM builds have fixed shapes; export again with these sizes in model.dims)"
                    )
            args.append(tvm.runtime.tensor(np.ascontiguousarray(arr)))
        return _flatten(self._main(*args))

    def describe(self) -> dict[str, Any]:
        return dict(self._info)


def _flatten(out) -> list[np.ndarray]:
    if hasattr(out, "numpy"):
        return [out.numpy()]
    flat: list[np.ndarray] = []
    for o in out:  # a tuple of outputs (possibly nested)
        flat.extend(_flatten(o))
    return flat


class TvmRuntime(Runtime):
    name = "tvm"
    formats = ("tvm",)

    def available(self) -> bool:
        try:
            import tvm  # noqa: F401
        except ImportError:
            return False
        return True

    def version(self) -> str:
        import tvm

        return tvm.__version__

    def load(self, artifact: Artifact, threads: int | None = None, **options: Any) -> Session:
        path = artifact.path("model")
        if not path.is_file():
            raise UserError(f"{path} does not exist; export the model again")
        builds = (artifact.meta.get("tvm") or {}).get("builds") or []
        build = next((b for b in builds if b.get("role") == "model"), {})
        _check_machine(path, build.get("target"))
        size_threadpool()
        try:
            import tvm
            from tvm import relax
        except ImportError:
            raise UserError("the tvm runtime needs Apache TVM; pip install 'edgekit[tvm]'") from None
        _use_threads(threads)
        try:
            vm = relax.VirtualMachine(tvm.runtime.load_module(str(path)), tvm.cpu())
        except Exception as e:
            first = str(e).strip().splitlines()[-1][:200] if str(e).strip() else type(e).__name__
            raise UserError(f"{path} cannot be loaded by TVM {tvm.__version__} ({first}); export it again with this TVM version") from None
        order = (artifact.meta.get("tvm") or {}).get("input_order") or [s.name for s in artifact.inputs]
        info = {
            "runtime": self.name,
            "version": tvm.__version__,
            "threads": threads or _pool_threads(),
            "target": build.get("target_json"),
            "tuned": bool(build.get("tuned")),
        }
        if build.get("tuned"):
            info["trials"] = build.get("trials")
        return TvmSession(vm, artifact.inputs, order, artifact.outputs, info, threads)


# -- machine ------------------------------------------------------------------------


def elf_machine(path: Path) -> str | None:
    """The ELF machine of a shared library as readelf names it (AArch64, ARM, x86-64), or None if not ELF."""
    with open(path, "rb") as f:
        head = f.read(20)
    if len(head) < 20 or head[:4] != b"\x7fELF":
        return None
    code = int.from_bytes(head[18:20], "little" if head[5] == 1 else "big")
    return _ELF_MACHINES.get(code, f"machine {code}")


def _check_machine(path: Path, target: str | None) -> None:
    lib = elf_machine(path)
    host_code = _HOST_MACHINES.get(platform.machine().lower())
    if lib is None or host_code is None or lib == _ELF_MACHINES.get(host_code):
        return
    built_for = f" (target {target})" if target and target != "host" else ""
    raise UserError(
        f"{path.name} is an {lib} library{built_for} and this machine is {platform.machine()}: it runs on the device, "
        "not here; copy the artifact there or time it with bench.device: ssh://user@host"
    )


# -- threads ------------------------------------------------------------------------


def size_threadpool() -> None:
    """Let TVM's pool start with every core (it reads TVM_NUM_THREADS once); sessions then take their share."""
    if "TVM_NUM_THREADS" not in os.environ:
        os.environ["TVM_NUM_THREADS"] = str(os.cpu_count() or 1)


_current: list[int | None] = [None]


def _use_threads(threads: int | None) -> None:
    """Set the number of TVM worker threads (when it changes); None keeps the pool as it is."""
    if not threads or _current[0] == threads:
        return
    import tvm

    config = tvm.get_global_func("runtime.config_threadpool", allow_missing=True)
    if config is not None:
        config(1, int(threads))  # 1: big cores first (all cores on a symmetric CPU)
    _current[0] = threads


def _pool_threads() -> int | None:
    import tvm

    num = tvm.get_global_func("runtime.NumThreads", allow_missing=True)
    return int(num()) if num is not None else None
