"""edgekit's benchmark runner for a device, copied there by ``runtimes/device.py``.

It runs with the device's own Python and imports only the standard library,
numpy and the runtime package (never edgekit), so a board needs nothing else.

    python3 device_runner.py JOB_DIR

JOB_DIR holds request.json, feeds.npz and the model files. Progress goes to
stdout, one JSON object per line after ``edgekit:``; partial.json is rewritten
after the warm-up and every few repeats; result.json is written at the end.
Exit codes: 0 done, 3 a module is missing on the device, 4 the model failed.
"""

import importlib
import importlib.util
import json
import os
import platform
import re
import sys
import time

PREFIX = "edgekit:"
MISSING, FAILED = 3, 4
# runtime -> (module, pip package) alternatives, tried in this order
RUNTIME_MODULES = {
    "onnxruntime": [("onnxruntime", "onnxruntime")],
    "litert": [("ai_edge_litert.interpreter", "ai-edge-litert"), ("tflite_runtime.interpreter", "tflite-runtime"), ("tensorflow.lite", "tensorflow")],
    "tvm": [("tvm", "apache-tvm")],
}
ORT_TYPES = {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(double)": "float64", "tensor(int64)": "int64",
             "tensor(int32)": "int32", "tensor(int8)": "int8", "tensor(uint8)": "uint8", "tensor(bool)": "bool"}
ORT_LEVELS = {"disable": "ORT_DISABLE_ALL", "basic": "ORT_ENABLE_BASIC", "extended": "ORT_ENABLE_EXTENDED", "all": "ORT_ENABLE_ALL"}


class RunnerError(Exception):
    pass


def emit(event, **fields):
    fields["event"] = event
    sys.stdout.write(PREFIX + json.dumps(fields) + "\n")
    sys.stdout.flush()


def write_json(path, data):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(data, f)
    os.replace(tmp, path)


def peak_rss_mb():
    """VmHWM first: ru_maxrss survives fork+exec, so it can report a parent's peak."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


def cpu_model():
    """'model name' on x86, 'Hardware' or 'Processor' (or 'cpu model') on ARM and MIPS boards."""
    found = {}
    try:
        with open("/proc/cpuinfo", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                key, value = key.strip().lower(), value.strip()
                if value and not value.isdigit():
                    found.setdefault(key, value)
    except OSError:
        pass
    for key in ("model name", "hardware", "processor", "cpu model"):
        if key in found:
            return found[key]
    return platform.processor() or platform.machine() or "unknown"


def device_facts():
    return {"cpu": cpu_model(), "cores": os.cpu_count(), "machine": platform.machine(), "os": platform.platform(),
            "python": platform.python_version()}


def package_version(package, module):
    try:
        from importlib.metadata import version

        return version(package)
    except Exception:
        return str(getattr(module, "__version__", "unknown"))


def import_runtime(runtime):
    """(module, pip package) of the first alternative that imports; exits with MISSING when none does."""
    alternatives = RUNTIME_MODULES[runtime]
    missing = [] if importlib.util.find_spec("numpy") else [("numpy", "numpy")]
    present = [(m, p) for m, p in alternatives if importlib.util.find_spec(m.split(".")[0])]
    if not present:
        missing += alternatives
    errors = []
    if not missing:
        for module_name, package in present:
            try:
                return importlib.import_module(module_name), package
            except ImportError as e:  # installed but broken (wrong CPU, old glibc, a missing dependency)
                errors.append("%s: %s" % (module_name, e))
        missing = present
    emit("missing", modules=[m for m, _ in missing], packages=[p for _, p in missing], errors=errors)
    sys.exit(MISSING)


def summarize(np, times, batch):
    t = np.asarray(times)
    p50, p90, p99 = np.percentile(t, [50, 90, 99])
    mean = float(t.mean())
    return {"latency_ms": {"p50": float(p50), "p90": float(p90), "p99": float(p99), "mean": mean,
                           "min": float(t.min()), "max": float(t.max())},
            "throughput_sps": batch / (mean / 1e3) if mean > 0 else None}


def load_onnx(ort, np, path, feeds, inputs, threads, options):
    level = options.get("graph_optimization", "all")
    so = ort.SessionOptions()
    so.graph_optimization_level = getattr(ort.GraphOptimizationLevel, ORT_LEVELS[level])
    so.log_severity_level = 3
    if threads:
        so.intra_op_num_threads, so.inter_op_num_threads = int(threads), 1
    s = ort.InferenceSession(path, sess_options=so, providers=["CPUExecutionProvider"])
    args = {i.name: feeds[i.name].astype(ORT_TYPES.get(i.type, feeds[i.name].dtype), copy=False) for i in s.get_inputs()}
    return (lambda: s.run(None, args)), {"providers": s.get_providers(), "graph_optimization": level}


def numbered(name):
    m = re.search(r"(\d+)$", name)
    return (int(m.group(1)) if m else 0, name)


def to_model_dtype(np, arr, detail):
    """Float feeds of a full-integer model are quantized with the input's own scale and zero point.

    The same rule as runtimes/litert.py's session; repeated here because the runner imports nothing of edgekit.
    """
    dtype = detail["dtype"]
    scale, zero = detail.get("quantization", (0.0, 0))
    if np.issubdtype(dtype, np.integer) and np.issubdtype(arr.dtype, np.floating) and scale:
        info = np.iinfo(dtype)
        return np.clip(np.round(arr / scale) + zero, info.min, info.max).astype(dtype)
    return arr.astype(dtype, copy=False)


def load_tflite(module, np, path, feeds, inputs, threads, options):
    kwargs = {"model_path": path}
    if threads:
        kwargs["num_threads"] = int(threads)
    xnnpack = bool(options.get("xnnpack", True))
    if not xnnpack:
        resolver = getattr(module, "OpResolverType", None)
        if resolver is None:
            raise RunnerError("this LiteRT package cannot turn XNNPACK off; install ai-edge-litert on the device")
        kwargs["experimental_op_resolver_type"] = resolver.BUILTIN_WITHOUT_DEFAULT_DELEGATES
    it = module.Interpreter(**kwargs)
    it.allocate_tensors()
    sig = it.get_signature_list()
    if sig:
        key = next(iter(sig))
        runner = it.get_signature_runner(key)
        details = runner.get_input_details()
        names = sorted(sig[key]["inputs"], key=numbered)  # args_0, args_1, ... in the artifact's input order
        args = {s: to_model_dtype(np, feeds[n], details[s]) for n, s in zip(inputs, names)}
        return (lambda: runner(**args)), {"xnnpack": xnnpack}
    details = it.get_input_details()
    args = [(d["index"], to_model_dtype(np, feeds[n], d)) for n, d in zip(inputs, details)]

    def call():
        for index, arr in args:
            it.set_tensor(index, arr)
        it.invoke()

    return call, {"xnnpack": xnnpack}


def load_tvm(tvm, np, path, feeds, inputs, threads, options):
    relax = importlib.import_module("tvm.relax")
    dev = tvm.cpu()
    vm = relax.VirtualMachine(tvm.runtime.load_module(path), dev)
    make = getattr(tvm.runtime, "tensor", None) or tvm.nd.array
    args = [make(feeds[n], dev) for n in inputs]
    main = vm["main"]
    return (lambda: main(*args)), {}


LOADERS = {"onnxruntime": load_onnx, "litert": load_tflite, "tvm": load_tvm}


def main(job):
    with open(os.path.join(job, "request.json")) as f:
        req = json.load(f)
    runtime, threads, warmup, repeats = req["runtime"], req["threads"], req["warmup"], req["repeats"]
    facts = device_facts()
    emit("start", pid=os.getpid(), device=facts)
    if threads:  # before the runtime is imported: TVM and OpenMP read these once
        os.environ["TVM_NUM_THREADS"] = os.environ["OMP_NUM_THREADS"] = str(threads)
    module, package = import_runtime(runtime)
    import numpy as np

    versions = {package: package_version(package, module), "numpy": np.__version__}
    with np.load(os.path.join(job, "feeds.npz"), allow_pickle=False) as z:
        feeds = {k: z[k] for k in z.files}
    batch = int(next(iter(feeds.values())).shape[0]) if feeds else 1
    baseline = peak_rss_mb()
    stage = "load"
    try:
        call, describe = LOADERS[runtime](module, np, os.path.join(job, req["model"]), feeds, req["inputs"], threads, req["options"])
        stage = "warm-up"
        for _ in range(warmup):
            call()
        stage = "run"
        partial_file = os.path.join(job, "partial.json")
        state = {"warmup_done": warmup, "repeats_done": 0, "repeats": repeats}
        write_json(partial_file, state)
        emit("progress", **state)
        times, every, last = [], max(1, min(50, repeats // 10)), time.monotonic()
        for i in range(1, repeats + 1):
            t0 = time.perf_counter_ns()
            call()
            times.append((time.perf_counter_ns() - t0) / 1e6)
            if i % every == 0 and i < repeats and (i == every or time.monotonic() - last >= 0.5):
                state.update(repeats_done=i, **summarize(np, times, batch))
                write_json(partial_file, state)
                emit("progress", **state)
                last = time.monotonic()
    except Exception as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
        emit("error", stage=stage, message="%s: %s" % (type(e).__name__, first))
        return FAILED
    describe.update(runtime=runtime, package=package, version=versions[package], threads=threads)
    result = {"runtime_version": versions[package], "batch_size": batch, **summarize(np, times, batch),
              "peak_rss_mb": peak_rss_mb(), "baseline_rss_mb": baseline, "describe": describe,
              "device": facts, "versions": versions}
    write_json(os.path.join(job, "result.json"), result)
    emit("done", repeats_done=repeats)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
