"""Benchmarks on a device over SSH, against a real OpenSSH server on 127.0.0.1.

The server runs as an ordinary child process with a throwaway host key, the
test's own client key and host-key checking on (a known_hosts file the test
writes). Its sessions get TMPDIR set to a folder of the test, so the device's
temporary folders (and any leftovers) are this test's alone.
"""

import getpass
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from edgekit.artifact import Artifact
from edgekit.cli import main
from edgekit.errors import UserError
from edgekit.runtimes.device import REMOTE_PREFIX, Device, DeviceRunFailed, benchmark_remote, parse_device

SSHD = Path("/usr/sbin/sshd")
FORM = "ssh://user@host[:port][?python=PATH]"


# -- parse_device ----------------------------------------------------------------


def test_parse_device_good_urls():
    d = parse_device("ssh://pi@raspberrypi.local")
    assert d == Device(user="pi", host="raspberrypi.local") and d.port == 22 and d.python == "python3"
    d = parse_device("ssh://root@10.0.0.2:2222?python=/usr/bin/python3.11&identity=~/.ssh/id_ed25519&known_hosts=/tmp/kh")
    assert (d.user, d.host, d.port, d.python, d.identity, d.known_hosts) == (
        "root", "10.0.0.2", 2222, "/usr/bin/python3.11", "~/.ssh/id_ed25519", "/tmp/kh")
    assert d.url == "ssh://root@10.0.0.2:2222?python=/usr/bin/python3.11"  # local key paths stay out of reports
    assert parse_device("ssh://u@[::1]:2200").url == "ssh://u@[::1]:2200"
    with pytest.raises(AttributeError):
        d.port = 1  # frozen


@pytest.mark.parametrize("url", [
    "ssh://host", "http://u@h", "ssh://u@h/path", "ssh://u@h:0", "ssh://u@h:70000", "ssh://u@h:22x", "ssh://-oProxyCommand=x@h",
    "ssh://u@-oProxyCommand=x", "ssh://u@h;rm", "ssh://u@h#frag", "ssh://u@h?python", "local", "",
])
def test_parse_device_bad_urls_name_the_form(url):
    with pytest.raises(ValueError, match=r"ssh://user@host\[:port\]\[\?python=PATH\]"):
        parse_device(url)


@pytest.mark.parametrize("url, words", [("ssh://u@h?foo=1", "not a device URL option"), ("ssh://u@h?python=", "once with a value"),
                                        ("ssh://u@h?python=a&python=b", "once with a value")])
def test_parse_device_bad_options(url, words):
    with pytest.raises(ValueError, match=words):
        parse_device(url)


def test_passwords_are_refused_and_never_echoed():
    with pytest.raises(ValueError, match="passwords in a device URL are refused; ssh logs in with keys or an agent only") as e:
        parse_device("ssh://pi:hunter2@board:99999")
    assert "hunter2" not in str(e.value)


def test_recipe_checks_the_device_url():
    from pydantic import ValidationError

    from edgekit.recipe import BenchSection

    assert BenchSection(device="ssh://pi@board:2222").device == "ssh://pi@board:2222"
    with pytest.raises(ValidationError, match="passwords"):
        BenchSection(device="ssh://pi:pw@board")


# -- a real sshd -----------------------------------------------------------------


def _require_sshd() -> None:
    if SSHD.is_file() and shutil.which("ssh") and shutil.which("scp") and shutil.which("ssh-keygen"):
        return
    reason = "needs OpenSSH (/usr/sbin/sshd, ssh, scp, ssh-keygen): apt-get install openssh-server, or run .ci/system-packages.sh"
    if os.environ.get("EDGEKIT_REQUIRE_SYSTEM_TOOLS"):
        pytest.fail(reason)
    pytest.skip(reason)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _keygen(path: Path) -> Path:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "edgekit-test", "-f", str(path)], check=True)
    return path


class SshServer:
    """``sshd -D -e`` on 127.0.0.1: a throwaway host key, one authorised client key, no passwords."""

    def __init__(self, root: Path, client_key: Path):
        root.mkdir(parents=True, exist_ok=True)
        self.root, self.client_key, self.port = root, client_key, _free_port()
        self.remote_tmp = root / "device-tmp"  # the device's TMPDIR
        self.remote_tmp.mkdir()
        host_key = _keygen(root / "host_ed25519")
        self.known_hosts = root / "known_hosts"
        kind, key = host_key.with_suffix(".pub").read_text().split()[:2]
        self.known_hosts.write_text(f"[127.0.0.1]:{self.port} {kind} {key}\n")
        config = root / "sshd_config"
        config.write_text("\n".join([
            f"Port {self.port}", "ListenAddress 127.0.0.1", f"HostKey {host_key}", f"AuthorizedKeysFile {client_key}.pub",
            "PubkeyAuthentication yes", "PasswordAuthentication no", "KbdInteractiveAuthentication no", "StrictModes no",
            "UsePAM no", f"PidFile {root / 'sshd.pid'}", "Subsystem sftp internal-sftp", f"SetEnv TMPDIR={self.remote_tmp}", "",
        ]))
        try:
            os.makedirs("/run/sshd", exist_ok=True)  # sshd's privilege separation folder (needed as root)
        except OSError:
            pass
        self.log = open(root / "sshd.log", "w")
        self.proc = subprocess.Popen([str(SSHD), "-D", "-e", "-f", str(config)], stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"sshd exited: {(root / 'sshd.log').read_text()}")
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", self.port)) == 0:
                    return
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"sshd did not listen on port {self.port}: {(root / 'sshd.log').read_text()}")

    def url(self, python: str = sys.executable, known_hosts: Path | None = None) -> str:
        return (f"ssh://{getpass.getuser()}@127.0.0.1:{self.port}?python={python}"
                f"&identity={self.client_key}&known_hosts={known_hosts or self.known_hosts}")

    def leftovers(self) -> list[str]:
        return sorted(p.name for p in self.remote_tmp.glob(f"{REMOTE_PREFIX}*"))

    def kill_everything(self) -> None:
        """The device dies: the server and every session under it (shells, runner) get SIGKILL at once."""
        for pid in [self.proc.pid, *_descendants(self.proc.pid)]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.proc.wait()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


def _descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


@pytest.fixture(scope="session")
def client_key(tmp_path_factory):
    _require_sshd()
    return _keygen(tmp_path_factory.mktemp("ssh-client") / "id_ed25519")


@pytest.fixture(scope="session")
def sshd(tmp_path_factory, client_key):
    server = SshServer(tmp_path_factory.mktemp("sshd"), client_key)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def onnx_artifact(tmp_path_factory) -> Artifact:
    from tests.test_export_onnx import cnn_artifact, export, make_ctx

    tmp = tmp_path_factory.mktemp("device-onnx")
    exported = export(cnn_artifact(), make_ctx(tmp), verify={"enabled": False})
    return exported.save(exported.folder)


def _feeds(artifact: Artifact, batch: int = 1):
    return {s.name: s.random({"batch": batch}) for s in artifact.inputs}


def _bench(artifact, url, **kw):
    settings = {"threads": 1, "warmup": 2, "repeats": 20, "options": {"graph_optimization": "all"}, **kw}
    return benchmark_remote(artifact, "onnxruntime", _feeds(artifact, 2), parse_device(url), **settings)


# -- end to end ------------------------------------------------------------------


def test_benchmark_on_device_end_to_end(sshd, onnx_artifact):
    from edgekit.runtimes.bench import benchmark

    row = _bench(onnx_artifact, sshd.url())
    local = benchmark(onnx_artifact, "onnxruntime", _feeds(onnx_artifact, 2), threads=1, warmup=1, repeats=2, isolate=False)
    assert set(local) - {"note"} <= set(row) and set(row) - set(local) == {"device"}  # the local harness's keys, plus device
    lat = row["latency_ms"]
    assert set(lat) == {"p50", "p90", "p99", "mean", "min", "max"} and 0 < lat["min"] <= lat["p50"] <= lat["p90"] <= lat["p99"] <= lat["max"]
    assert row["repeats"] == 20 and row["batch_size"] == 2 and row["throughput_sps"] > 0 and row["peak_rss_mb"] > 0
    assert row["runtime_version"] == row["describe"]["version"] and row["describe"]["threads"] == 1
    device = row["device"]
    assert device["url"] == f"ssh://{getpass.getuser()}@127.0.0.1:{sshd.port}?python={sys.executable}"  # no key paths
    assert device["cores"] == os.cpu_count() and device["machine"] == os.uname().machine and device["cpu"]
    assert device["python"] == ".".join(map(str, sys.version_info[:3])) and device["runtimes"]["onnxruntime"]
    assert sshd.leftovers() == []  # the device's temporary folder is gone


def test_cli_bench_on_device(sshd, onnx_artifact, capsys):
    with pytest.raises(SystemExit) as e:
        main(["bench", str(onnx_artifact.folder), "--device", sshd.url(), "--repeats", "5", "--warmup", "1", "--batch", "3", "--json"])
    out = capsys.readouterr().out
    assert e.value.code == 0
    (row,) = json.loads(out)["results"]
    assert row["batch_size"] == 3 and row["repeats"] == 5 and row["device"]["url"].startswith("ssh://")
    assert sshd.leftovers() == []


def test_cli_bench_model_file_locally_and_bad_device(onnx_artifact, capsys):
    with pytest.raises(SystemExit) as e:
        main(["bench", str(onnx_artifact.path("model")), "--repeats", "3", "--warmup", "0", "--threads", "1", "--threads", "2"])
    out = capsys.readouterr().out
    assert e.value.code == 0 and "onnxruntime" in out and "p50 ms" in out
    with pytest.raises(SystemExit) as e:
        main(["bench", str(onnx_artifact.folder), "--device", "ssh://pi:secret@board"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and len(err.strip().splitlines()) == 1 and "passwords" in err and "secret" not in err


# -- clear errors ----------------------------------------------------------------


def test_unreachable_device_says_connection_refused(client_key, onnx_artifact, tmp_path):
    kh = tmp_path / "known_hosts"
    kh.write_text("")
    url = f"ssh://{getpass.getuser()}@127.0.0.1:{_free_port()}?identity={client_key}&known_hosts={kh}"
    with pytest.raises(UserError, match="is unreachable: connection refused on 127.0.0.1 port"):
        _bench(onnx_artifact, url)


@pytest.mark.parametrize("case", ["unknown", "changed"])
def test_host_key_is_checked_not_accepted(sshd, onnx_artifact, tmp_path, case):
    kh = tmp_path / "known_hosts"
    if case == "unknown":
        kh.write_text("")
    else:
        kind, key = _keygen(tmp_path / "other").with_suffix(".pub").read_text().split()[:2]
        kh.write_text(f"[127.0.0.1]:{sshd.port} {kind} {key}\n")
    before = kh.read_text()
    words = "its host key is not in" if case == "unknown" else "its host key changed"
    with pytest.raises(UserError, match=f"is unreachable: {words}"):
        _bench(onnx_artifact, sshd.url(known_hosts=kh))
    assert kh.read_text() == before  # never silently accepted
    assert sshd.leftovers() == []


def _python_without_onnxruntime(tmp_path: Path) -> str:
    system = Path("/usr/bin/python3")
    if system.is_file():
        probe = subprocess.run([str(system), "-c", "import importlib.util as u; print(u.find_spec('onnxruntime') is None)"],
                               capture_output=True, text=True)
        if probe.stdout.strip() == "True":
            return str(system)
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(tmp_path / "bare")], check=True)
    return str(tmp_path / "bare" / "bin" / "python")


def test_missing_runtime_names_the_package(sshd, onnx_artifact, tmp_path):
    python = _python_without_onnxruntime(tmp_path)
    with pytest.raises(UserError, match=r"lacks .*onnxruntime.* -m pip install .*onnxruntime") as e:
        _bench(onnx_artifact, sshd.url(python=python))
    assert python in str(e.value)
    assert sshd.leftovers() == []


def test_missing_remote_python(sshd, onnx_artifact):
    with pytest.raises(UserError, match="has no Python at /nonexistent/python3; install python3 there or name"):
        _bench(onnx_artifact, sshd.url(python="/nonexistent/python3"))
    assert sshd.leftovers() == []


# -- a device that dies mid-run ----------------------------------------------------


def _when_running(server: SshServer, action) -> threading.Thread:
    """Call ``action`` once the runner has rewritten its partial result with timed repeats in it."""

    def watch():
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            for f in server.remote_tmp.glob(f"{REMOTE_PREFIX}*/job/partial.json"):
                try:
                    done = json.loads(f.read_text()).get("repeats_done", 0)
                except (OSError, ValueError):
                    continue
                if done > 0:
                    time.sleep(0.3)  # let the streamed progress line reach this side too
                    action()
                    return
            time.sleep(0.02)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


@pytest.mark.timeout(120)
def test_device_dying_mid_run_keeps_partial_results(client_key, onnx_artifact, tmp_path):
    server = SshServer(tmp_path / "dying", client_key)
    try:
        watcher = _when_running(server, server.kill_everything)
        with pytest.raises(DeviceRunFailed) as e:
            _bench(onnx_artifact, server.url(), repeats=10**6, warmup=1)
        watcher.join(5)
    finally:
        server.stop()
    partial = e.value.partial
    assert partial["repeats_done"] > 0 and partial["repeats"] == 10**6 and partial["latency_ms"]["p50"] > 0
    assert partial["device"]["cores"] == os.cpu_count()  # device facts came with the first progress line
    message = str(e.value)
    assert f"stopped after {partial['repeats_done']} of 1000000 timed repeats (the connection broke)" in message
    assert "is still on the device" in message  # it could not be removed: the device is gone
    assert len(server.leftovers()) == 1


@pytest.mark.timeout(120)
def test_runner_killed_on_device_keeps_partial_results_and_cleans_up(sshd, onnx_artifact):
    def kill_runner():
        for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
            try:
                args = cmdline.read_bytes().split(b"\0")
            except OSError:
                continue
            if any(a.endswith(b"device_runner.py") for a in args[1:3]) and str(sshd.remote_tmp).encode() in args[-2]:
                os.kill(int(cmdline.parent.name), signal.SIGKILL)

    watcher = _when_running(sshd, kill_runner)
    with pytest.raises(DeviceRunFailed, match=r"stopped after \d+ of 1000000 timed repeats \(the runner was killed by signal 9") as e:
        _bench(onnx_artifact, sshd.url(), repeats=10**6, warmup=1)
    watcher.join(5)
    assert e.value.partial["repeats_done"] > 0 and e.value.partial["latency_ms"]["max"] > 0
    assert sshd.leftovers() == []
