"""Benchmark on a device over SSH: the measurement of ``runtimes.bench``, made on
the device by a self-contained runner (``device_runner.py``) with its own Python.

    device = parse_device("ssh://pi@raspberrypi.local?python=/usr/bin/python3")
    row = benchmark_remote(artifact, "onnxruntime", feeds, device, threads=4, warmup=10, repeats=100, options={})

Only the system ``ssh`` and ``scp`` run, from argument lists, with keys or an
agent only (``BatchMode``) and host-key checking on. Each run works in a fresh
folder made by ``mktemp -d`` on the device and removes it afterwards, whatever
happened. The runner rewrites a partial result as it goes and streams progress
lines, so a device that dies mid-run still leaves the repeats it finished.
"""

from __future__ import annotations

import ipaddress
import json
import re
import shlex
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, quote, urlsplit

import numpy as np

from edgekit.artifact import Artifact
from edgekit.errors import StepFailed, UserError

FORM = "ssh://user@host[:port][?python=PATH]"
OPTIONS = ("python", "identity", "known_hosts")
CONNECT_TIMEOUT = 10  # seconds; a dead device is noticed after 3 unanswered keep-alives 10 s apart
REMOTE_PREFIX = "edgekit-device."  # the device's temporary folders: ${TMPDIR:-/tmp}/edgekit-device.XXXXXXXX
RUNNER = Path(__file__).with_name("device_runner.py")
PROGRESS = "edgekit:"  # device_runner.PREFIX
MISSING, FAILED = 3, 4  # device_runner's exit codes
FORMATS = {"onnxruntime": ("onnx",), "litert": ("tflite",), "tvm": ("tvm",)}
INSTALL = {"onnxruntime": "onnxruntime", "litert": "ai-edge-litert (or tflite-runtime)", "tvm": "apache-tvm"}
LABELS = {"onnxruntime": "onnxruntime", "litert": "a LiteRT interpreter (ai_edge_litert, tflite_runtime or tensorflow)", "tvm": "tvm"}

_USER = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]*\Z")
_HOST = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?\Z")
_REMOTE_DIR = re.compile(r"/[A-Za-z0-9_./-]+\Z")


@dataclass(frozen=True)
class Device:
    """Where to benchmark: ``ssh://user@host[:port]`` plus the remote interpreter and local key files."""

    user: str
    host: str
    port: int = 22
    python: str = "python3"
    identity: str | None = None  # private key file on this machine (else ssh's defaults or the agent)
    known_hosts: str | None = None  # known_hosts file on this machine (else the user's)

    @property
    def url(self) -> str:
        """The URL without local file paths, as reports show it."""
        port = f":{self.port}" if self.port != 22 else ""
        query = f"?python={quote(self.python, safe='/')}" if self.python != "python3" else ""
        return f"ssh://{self.user}@{self._bracketed}{port}{query}"

    @property
    def _bracketed(self) -> str:
        return f"[{self.host}]" if ":" in self.host else self.host

    def __str__(self) -> str:
        return self.url


class DeviceRunFailed(StepFailed):
    """The benchmark started on the device but did not finish; ``partial`` holds what it measured."""

    def __init__(self, message: str, partial: dict[str, Any]):
        super().__init__(message)
        self.partial = partial


def parse_device(url: str) -> Device:
    """``ssh://user@host[:port][?python=PATH&identity=PATH&known_hosts=PATH]`` -> Device; ValueError otherwise."""
    bad = f"{url!r} is not a device; use local or {FORM}"
    if not isinstance(url, str) or not url.startswith("ssh://"):
        raise ValueError(bad)
    parts = urlsplit(url)
    if parts.password is not None:  # checked first: no message below may echo it
        raise ValueError(
            f"ssh://{parts.username}@{parts.hostname}: passwords in a device URL are refused; ssh logs in with keys or an agent only, "
            "so drop ':PASSWORD' and install your public key on the device"
        )
    try:
        port = 22 if parts.port is None else parts.port
    except ValueError:
        port = 0
    if not 1 <= port <= 65535:
        raise ValueError(f"{url!r} has a bad port; use {FORM} with a port from 1 to 65535")
    user, host = parts.username, parts.hostname
    if not user or not host or not _USER.match(user) or parts.path not in ("", "/") or parts.fragment:
        raise ValueError(bad)
    if not _HOST.match(host):
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(bad) from None
    try:
        pairs = parse_qsl(parts.query, keep_blank_values=True, strict_parsing=bool(parts.query))
    except ValueError:
        raise ValueError(bad) from None
    query: dict[str, str] = {}
    for key, value in pairs:
        if key not in OPTIONS:
            raise ValueError(f"{key!r} is not a device URL option; use {', '.join(OPTIONS)}, as in {FORM}")
        if key in query or not value or any(c in value for c in "\0\n\r"):
            raise ValueError(f"{key} must appear once with a value in {url!r}; use {FORM}")
        query[key] = value
    return Device(user=user, host=host, port=port, python=query.get("python", "python3"),
                  identity=query.get("identity"), known_hosts=query.get("known_hosts"))


def benchmark_remote(
    artifact: Artifact,
    runtime: str,
    feeds: dict[str, np.ndarray],
    device: Device,
    *,
    threads: int,
    warmup: int,
    repeats: int,
    options: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Time ``artifact`` on ``device``: the keys of ``runtimes.bench.benchmark`` plus ``device`` (where and with what)."""
    if runtime not in FORMATS:
        raise UserError(f"runtime {runtime} does not run on devices; benchmark the {', '.join(FORMATS)} runtimes there")
    if artifact.format not in FORMATS[runtime]:
        raise UserError(f"runtime {runtime} runs {', '.join(FORMATS[runtime])} models, not {artifact.format}")
    if artifact.folder is None or "model" not in artifact.files:
        raise UserError("a device benchmark needs a saved artifact with a model file; save the artifact first")
    missing = [s.name for s in artifact.inputs if s.name not in feeds]
    if missing:
        raise UserError(f"feeds lack inputs {', '.join(missing)} of the model; pass one array per input")
    remote = _Remote(device)
    with tempfile.TemporaryDirectory(prefix="edgekit-device-") as tmp:
        job = _stage(Path(tmp) / "job", artifact, runtime, feeds, threads, warmup, repeats, options or {})
        folder = remote.make_folder()
        try:
            result = remote.run(folder, job, runtime, repeats)
        except DeviceRunFailed as e:
            if remote.remove(folder):
                raise
            raise DeviceRunFailed(f"{e}; {folder} is still on the device, remove it when the device is back", e.partial) from None
        except BaseException:
            remote.remove(folder)
            raise
        remote.remove(folder)
    return {
        "runtime": runtime,
        "runtime_version": result["runtime_version"],
        "threads": threads,
        "batch_size": result["batch_size"],
        "warmup": warmup,
        "repeats": repeats,
        "isolated": True,
        "latency_ms": result["latency_ms"],
        "throughput_sps": result["throughput_sps"],
        "peak_rss_mb": result["peak_rss_mb"],
        "baseline_rss_mb": result["baseline_rss_mb"],
        "describe": result["describe"],
        "device": {"url": device.url, **result["device"], "runtimes": result["versions"]},
    }


def _stage(job: Path, artifact: Artifact, runtime, feeds, threads, warmup, repeats, options) -> Path:
    """A local folder holding what the device needs: the model files (linked), request, feeds and runner."""
    job.mkdir()
    names = {role: Path(name).name for role, name in artifact.files.items()}
    if len(set(names.values())) != len(names) or set(names.values()) & {"request.json", "feeds.npz", RUNNER.name}:
        raise UserError(f"the artifact's files {sorted(artifact.files.values())} clash by name; give each file its own name")
    for role, name in names.items():
        (job / name).symlink_to(artifact.path(role).resolve())  # scp follows links
    np.savez(job / "feeds.npz", **feeds)
    request = {"runtime": runtime, "threads": threads, "warmup": warmup, "repeats": repeats, "options": options,
               "model": names["model"], "inputs": [s.name for s in artifact.inputs]}
    (job / "request.json").write_text(json.dumps(request))
    (job / RUNNER.name).write_bytes(RUNNER.read_bytes())
    return job


class _Remote:
    """The ssh and scp commands for one device."""

    def __init__(self, device: Device):
        self.device = device
        for label, path in (("identity", device.identity), ("known_hosts", device.known_hosts)):
            if path and not Path(path).expanduser().is_file():
                raise UserError(f"{label} file {path} of device {device.url} does not exist; fix ?{label}= in the device URL")
        opts = ["-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=yes", "-o", f"ConnectTimeout={CONNECT_TIMEOUT}",
                "-o", "ServerAliveInterval=10", "-o", "ServerAliveCountMax=3", "-o", "LogLevel=ERROR"]
        if device.identity:
            opts += ["-i", _ssh_path(device.identity), "-o", "IdentitiesOnly=yes"]
        if device.known_hosts:
            opts += ["-o", f'UserKnownHostsFile="{_ssh_path(device.known_hosts)}"']
        self.opts = opts
        self.login = f"{device.user}@{device.host}"

    # -- commands ----------------------------------------------------------
    def _ssh(self, command: str) -> list[str]:
        return ["ssh", *self.opts, "-p", str(self.device.port), "--", self.login, command]

    def _call(self, argv: list[str], timeout: float | None) -> subprocess.CompletedProcess:
        try:
            return subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout)
        except FileNotFoundError:
            raise UserError(f"{argv[0]} is not installed on this machine; install the OpenSSH client (openssh-client)") from None
        except subprocess.TimeoutExpired:
            raise UserError(
                f"device {self.device.url} is unreachable: {argv[0]} got no answer in {timeout:.0f} s; check the device and the network"
            ) from None

    def _scp(self, sources: list[str], target: str, timeout: float | None = None) -> subprocess.CompletedProcess:
        argv = ["scp", "-q", "-r", *self.opts, "-P", str(self.device.port), "--", *sources, target]
        proc = self._call(argv, timeout)
        if proc.returncode != 0 and "subsystem" in proc.stderr.lower():  # no SFTP server on the device: the classic protocol
            proc = self._call(argv[:1] + ["-O"] + argv[1:], timeout)
        return proc

    def _remote_path(self, path: str) -> str:
        return f"{self.device.user}@{self.device._bracketed}:{path}"

    # -- steps -------------------------------------------------------------
    def make_folder(self) -> str:
        """Check the remote Python, then ``mktemp -d`` on the device."""
        py = shlex.quote(self.device.python)
        check = shlex.quote("import sys; print('%d.%d' % sys.version_info[:2])")
        proc = self._call(self._ssh(f'{py} -c {check} && mktemp -d "${{TMPDIR:-/tmp}}/{REMOTE_PREFIX}XXXXXXXX"'), CONNECT_TIMEOUT + 50)
        self._raise_for_connection(proc)
        lines = proc.stdout.strip().splitlines()
        if proc.returncode in (126, 127) or not lines:
            raise UserError(
                f"device {self.device.url} has no Python at {self.device.python}; install python3 there or name its "
                f"interpreter with ?python=PATH in the device URL"
            )
        if proc.returncode != 0 or len(lines) < 2 or not _REMOTE_DIR.match(lines[-1]) or REMOTE_PREFIX not in lines[-1]:
            raise StepFailed(f"could not make a temporary folder on {self.device.url} ({_last(proc.stderr)}); check that its /tmp is writable")
        folder = lines[-1]
        if not re.fullmatch(r"\d+\.\d+", lines[-2]):
            self.remove(folder)
            raise StepFailed(f"{self.device.python} on {self.device.url} did not report its version ({lines[-2][:100]!r}); check that it is a Python")
        major, minor = (int(x) for x in lines[-2].split("."))
        if (major, minor) < (3, 7):
            self.remove(folder)
            raise UserError(
                f"{self.device.python} on {self.device.url} is Python {major}.{minor}; the runner needs 3.7 or newer, name one with ?python=PATH"
            )
        return folder

    def run(self, folder: str, job: Path, runtime: str, repeats: int) -> dict[str, Any]:
        """Copy the job, run the runner streaming its progress, fetch the result."""
        proc = self._scp([str(job)], self._remote_path(folder + "/"))
        self._raise_for_connection(proc, scp=True)
        if proc.returncode != 0:
            raise StepFailed(f"copying the model to {self.device.url} failed ({_last(proc.stderr)}); check the free space in {folder}")
        remote_job = f"{folder}/{job.name}"
        # "; exit $?" keeps the shell in between, so a killed runner shows as 128 + signal, not as ssh's own 255
        command = f"{shlex.quote(self.device.python)} -u {shlex.quote(remote_job + '/' + RUNNER.name)} {shlex.quote(remote_job)}; exit $?"
        events: dict[str, dict[str, Any]] = {}
        other: list[str] = []
        with tempfile.TemporaryFile("w+") as err:
            try:
                p = subprocess.Popen(self._ssh(command), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=err, text=True)
            except FileNotFoundError:
                raise UserError("ssh is not installed on this machine; install the OpenSSH client (openssh-client)") from None
            with p:
                for line in p.stdout:
                    event = _event(line)
                    if event:
                        events[event["event"]] = event
                    elif line.strip():
                        other = (other + [line.strip()])[-3:]
            err.seek(0)
            stderr = err.read()
        rc = p.returncode
        detail = _last(stderr or "\n".join(other))
        if rc == 0 and "done" in events:
            fetched = job.parent / "result.json"
            proc = self._scp([self._remote_path(f"{remote_job}/result.json")], str(fetched), timeout=CONNECT_TIMEOUT + 110)
            if proc.returncode == 0:
                return json.loads(fetched.read_text())
            raise self._lost(events, remote_job, job, repeats, "the result could not be fetched")
        if "start" not in events:
            self._raise_for_connection(subprocess.CompletedProcess([], rc, "", stderr))
            raise StepFailed(f"the runner did not start on {self.device.url} ({detail}); check {self.device.python} there")
        if rc == MISSING and "missing" in events:
            raise self._missing(events["missing"], runtime)
        if rc == FAILED and "error" in events:
            e = events["error"]
            message = f"the model failed on {self.device.url} during {e['stage']}: {e['message']}"
            if "progress" not in events:
                raise StepFailed(message)
            raise self._lost(events, remote_job, job, repeats, message)
        if rc == 255:
            reason = "the connection broke"
        elif rc > 128:
            reason = f"the runner was killed by signal {rc - 128}" + (", perhaps for lack of memory" if rc - 128 == 9 else "")
        else:
            reason = f"the runner ended with exit code {rc}: {detail}"
        raise self._lost(events, remote_job, job, repeats, reason)

    def remove(self, folder: str) -> bool:
        try:
            proc = self._call(self._ssh(f"rm -rf -- {shlex.quote(folder)}"), CONNECT_TIMEOUT + 20)
        except UserError:
            return False
        return proc.returncode == 0

    # -- errors ------------------------------------------------------------
    def _lost(self, events, remote_job: str, job: Path, repeats: int, reason: str) -> DeviceRunFailed:
        """The run ended early: what the runner measured, from its partial file or else its streamed progress."""
        partial = dict(events.get("progress") or {})
        fetched = job.parent / "partial.json"
        try:
            proc = self._scp([self._remote_path(f"{remote_job}/partial.json")], str(fetched), timeout=CONNECT_TIMEOUT + 20)
            if proc.returncode == 0:
                on_device = json.loads(fetched.read_text())
                if on_device.get("repeats_done", 0) >= partial.get("repeats_done", 0):
                    partial = on_device
        except (UserError, ValueError):
            pass
        partial.pop("event", None)
        partial.setdefault("repeats_done", 0)
        partial.setdefault("repeats", repeats)
        partial["device"] = {"url": self.device.url, **(events.get("start") or {}).get("device", {})}
        done = partial["repeats_done"]
        return DeviceRunFailed(
            f"the benchmark on {self.device.url} stopped after {done} of {repeats} timed repeats ({reason}); "
            "the partial results are attached, check that the device is powered, reachable and has free memory, then run again",
            partial,
        )

    def _missing(self, event: dict[str, Any], runtime: str) -> UserError:
        py, url = self.device.python, self.device.url
        if event.get("errors"):
            return UserError(
                f"{INSTALL[runtime]} is installed on {url} but does not import for {py} ({event['errors'][0]}); "
                f"reinstall it there with {py} -m pip install --force-reinstall"
            )
        numpy = "numpy" in event["modules"]
        lacking = (["numpy"] if numpy else []) + ([LABELS[runtime]] if any(m != "numpy" for m in event["modules"]) else [])
        packages = (["numpy"] if numpy else []) + ([INSTALL[runtime]] if len(lacking) > numpy else [])
        them = "them" if len(packages) > 1 else "it"
        return UserError(f"device {url} lacks {' and '.join(lacking)} for {py}; install {them} there: {py} -m pip install {' '.join(packages)}")

    def _raise_for_connection(self, proc: subprocess.CompletedProcess, scp: bool = False) -> None:
        """Turn ssh's own failures (exit 255; scp exits 1) into one sentence naming the cause and the fix."""
        if proc.returncode != 255 and not (scp and proc.returncode != 0):
            return
        d, text = self.device, proc.stderr
        where = f"device {d.url} is unreachable"
        known = d.known_hosts or "~/.ssh/known_hosts"
        checks = [
            (("Connection refused",), f"{where}: connection refused on {d.host} port {d.port}; check that sshd runs there and the port is right"),
            (("timed out",), f"{where}: the connection timed out; check the address, the network and that the device is on"),
            (("Could not resolve", "Name or service not known"), f"{where}: the host name {d.host} does not resolve; fix it or use the IP address"),
            (("No route to host", "Network is unreachable"), f"{where}: no route to {d.host}; check the network"),
            (("IDENTIFICATION HAS CHANGED",), f"{where}: its host key changed since it was recorded in {known}; if the device was "
                                               f"reinstalled, remove the old key with ssh-keygen -R '[{d.host}]:{d.port}' and add the new one"),
            (("host key is known", "Host key verification failed"), f"{where}: its host key is not in {known}; check its fingerprint, then "
                                                                     f"add it with ssh-keyscan -p {d.port} {d.host} >> {known}"),
            (("Permission denied (",), f"device {d.url} refused the login of {d.user}: no key it accepts; add your public key to its "
                                     "authorized_keys, load the key into ssh-agent, or name it with ?identity=PATH"),
        ]
        for needles, message in checks:
            if any(n in text for n in needles):
                raise UserError(message)
        if scp:
            return  # a failure of the copy itself: the caller says which
        raise UserError(f"{where}: ssh failed ({_last(text)}); check that ssh -p {d.port} {self.login} works from this machine")


def _event(line: str) -> dict[str, Any] | None:
    """A runner progress line (``edgekit:{...}``) as a dict; None for anything else it printed."""
    if not line.startswith(PROGRESS):
        return None
    try:
        event = json.loads(line[len(PROGRESS):])
    except ValueError:
        return None
    return event if isinstance(event, dict) and "event" in event else None


def _ssh_path(path: str) -> str:
    """A local path for ssh's -i / -o options: ~ expanded, % escaped (ssh expands %-tokens there)."""
    p = str(Path(path).expanduser().resolve())
    if '"' in p:
        raise UserError(f"{path} contains a double quote, which ssh options cannot carry; move or rename the file")
    return p.replace("%", "%%")


def _last(text: str) -> str:
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1][:300] if lines else "no output"
