"""The operator tests' view of a cluster: BlockPull objects, Events, kubectl and agent processes.

Everything here talks to the API over HTTP with the official client or kubectl, so the same
tests run against the in-process stand-in (default) or a real cluster (`pytest --cluster`,
using `$KUBECONFIG`). Only `Cluster.stand_in` is stand-in specific (request recording), and
tests that use it say what they check instead on a real cluster.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import kubernetes
from kubernetes.client.exceptions import ApiException
from prometheus_client.parser import text_string_to_metric_families

from qemulab import Chain, backing_chain, check, compare
from testapiserver import ThreadedAPIServer

GROUP, VERSION, PLURAL = "blockpull.dev", "v1alpha1", "blockpulls"
REPO = Path(__file__).resolve().parents[2]
CRD = REPO / "crds" / "blockpull.dev_blockpulls.yaml"
FINALIZER = "blockpull.dev/agent"


def assert_intact(chain: Chain) -> None:
    """The disk still shows the guest the template's data through its whole, valid chain."""
    assert backing_chain(chain.top) == [str(p) for p in reversed(chain.images)]
    assert compare(chain.top, chain.reference)
    assert check(chain.top).corruptions == 0


def assert_flattened(chain: Chain, keep: int = 0) -> None:
    """The disk needs nothing above `chain.images[keep - 1]` and shows the same data."""
    expected = [str(chain.top)] + [str(p) for p in reversed(chain.images[:keep])]
    assert backing_chain(chain.top) == expected
    assert compare(chain.top, chain.reference)
    assert check(chain.top).clean


def assert_no_jobs(vm: Any, timeout: float = 5.0) -> None:
    """QEMU holds no job (any more): the agent dismisses a job right after writing its outcome."""
    try:
        eventually(lambda: vm.execute_sync("query-jobs") == [], timeout=timeout, what="no job in QEMU")
    except Timeout:
        assert vm.execute_sync("query-jobs") == []


def socket_path(sockets: Path, namespace: str, vm: str) -> Path:
    """Where the tests' agents look for a VM's QMP socket (their template)."""
    return sockets / namespace / f"{vm}.qmp"


class Timeout(AssertionError):
    pass


def eventually(
    probe: Callable[[], Any], *, timeout: float = 20.0, interval: float = 0.05, what: str = ""
) -> Any:
    """Call `probe` until it returns something truthy; that value, or Timeout with the last one."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while True:
        last = probe()
        if last:
            return last
        if time.monotonic() > deadline:
            raise Timeout(f"timed out after {timeout:g}s waiting for {what or probe}; last: {last!r}")
        time.sleep(interval)


@dataclass
class Cluster:
    """Where the tests' API is: the stand-in (recording requests) or a real cluster."""

    kubeconfig: Path
    workdir: Path
    stand_in: ThreadedAPIServer | None = None
    _clients: dict[str, kubernetes.client.ApiClient] = field(default_factory=dict)

    def kubeconfig_for(self, user: str) -> Path:
        """A kubeconfig whose requests the stand-in records as `user` (on a real cluster: ours)."""
        if self.stand_in is None:
            return self.kubeconfig
        return self.stand_in.write_kubeconfig(self.workdir / f"kubeconfig-{user}", user=user)

    def api_client(self) -> kubernetes.client.ApiClient:
        if "admin" not in self._clients:
            self._clients["admin"] = kubernetes.config.new_client_from_config(
                config_file=str(self.kubeconfig)
            )
        return self._clients["admin"]

    def close(self) -> None:
        for client in self._clients.values():
            client.close()


class Namespace:
    """BlockPulls, Events and kubectl in one test namespace."""

    def __init__(self, cluster: Cluster, name: str) -> None:
        self.cluster = cluster
        self.name = name
        client = cluster.api_client()
        self.custom = kubernetes.client.CustomObjectsApi(client)
        self.core = kubernetes.client.CoreV1Api(client)

    # --- BlockPull objects ------------------------------------------------------------------

    @staticmethod
    def manifest(name: str, **spec: Any) -> dict[str, Any]:
        return {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": "BlockPull",
            "metadata": {"name": name},
            "spec": spec,
        }

    def create(self, name: str, **spec: Any) -> dict[str, Any]:
        body: dict[str, Any] = self.custom.create_namespaced_custom_object(
            GROUP, VERSION, self.name, PLURAL, self.manifest(name, **spec)
        )
        return body

    def get(self, name: str) -> dict[str, Any] | None:
        try:
            body: dict[str, Any] = self.custom.get_namespaced_custom_object(
                GROUP, VERSION, self.name, PLURAL, name
            )
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise
        return body

    def status(self, name: str) -> dict[str, Any]:
        body = self.get(name)
        assert body is not None, f"{name} is gone"
        return dict(body.get("status") or {})

    def patch_spec(self, name: str, **spec: Any) -> dict[str, Any]:
        body: dict[str, Any] = self.custom.patch_namespaced_custom_object(
            GROUP, VERSION, self.name, PLURAL, name, {"spec": spec}
        )
        return body

    def delete(self, name: str) -> None:
        with contextlib.suppress(ApiException):
            self.custom.delete_namespaced_custom_object(GROUP, VERSION, self.name, PLURAL, name)

    def wait_phase(self, name: str, *phases: str, timeout: float = 30.0) -> dict[str, Any]:
        def probe() -> dict[str, Any] | None:
            status = self.status(name)
            return status if status.get("phase") in phases else None

        return self._wait(probe, timeout, name, f"phase in {phases}")

    def wait_reason(self, name: str, phase: str, reason: str, timeout: float = 30.0) -> dict[str, Any]:
        def probe() -> dict[str, Any] | None:
            status = self.status(name)
            return status if (status.get("phase"), status.get("reason")) == (phase, reason) else None

        return self._wait(probe, timeout, name, f"{phase}/{reason}")

    def _wait(self, probe: Callable[[], Any], timeout: float, name: str, what: str) -> dict[str, Any]:
        try:
            result: dict[str, Any] = eventually(probe, timeout=timeout, what=f"{name} {what}")
        except Timeout as exc:
            raise Timeout(f"{exc}\nstatus of {name}: {self.status(name)}") from None
        return result

    def wait_gone(self, name: str, timeout: float = 30.0) -> None:
        eventually(lambda: self.get(name) is None, timeout=timeout, what=f"{name} deleted")

    def condition(self, name: str, type_: str) -> dict[str, Any]:
        for cond in self.status(name).get("conditions") or []:
            if cond.get("type") == type_:
                return dict(cond)
        raise AssertionError(f"{name} has no {type_} condition: {self.status(name)}")

    def conditions(self, name: str) -> dict[str, str]:
        return {c["type"]: c["status"] for c in self.status(name).get("conditions") or []}

    # --- Events -----------------------------------------------------------------------------

    def events(self, name: str) -> list[dict[str, Any]]:
        """Events about `name`, oldest first, as (type, reason, message) dicts."""
        listed = self.core.list_namespaced_event(self.name, field_selector=f"involvedObject.name={name}")
        items = sorted(
            listed.items,
            key=lambda e: (
                e.last_timestamp or e.event_time or e.metadata.creation_timestamp or 0,
                e.metadata.name,
            ),
        )
        return [
            {
                "type": e.type,
                "reason": e.reason,
                "message": e.message,
                "component": e.source.component if e.source else None,
                "host": e.source.host if e.source else None,
            }
            for e in items
        ]

    def event_reasons(self, name: str) -> list[str]:
        return [e["reason"] for e in self.events(name)]

    def assert_event_reasons(self, name: str, expected: list[str], timeout: float = 5.0) -> None:
        """The Events about `name` come to be exactly `expected` (they trail the status)."""
        try:
            eventually(lambda: self.event_reasons(name) == expected, timeout=timeout, what="events")
        except Timeout:
            assert self.event_reasons(name) == expected

    def wait_event(self, name: str, reason: str, timeout: float = 20.0) -> dict[str, Any]:
        def probe() -> dict[str, Any] | None:
            return next((e for e in self.events(name) if e["reason"] == reason), None)

        result: dict[str, Any] = eventually(probe, timeout=timeout, what=f"Event {reason} on {name}")
        return result

    # --- kubectl ----------------------------------------------------------------------------

    def kubectl(
        self, *args: str, check: bool = True, input: str | None = None, timeout: float = 60.0
    ) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(
            ["kubectl", f"--kubeconfig={self.cluster.kubeconfig}", "-n", self.name, *args],
            capture_output=True,
            text=True,
            input=input,
            timeout=timeout,
            check=False,
        )
        if check and proc.returncode != 0:
            raise AssertionError(
                f"kubectl {' '.join(args)} -> {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
            )
        return proc

    def apply(self, manifest: Mapping[str, Any], *, check: bool = True) -> subprocess.CompletedProcess[str]:
        return self.kubectl("apply", "-f", "-", input=json.dumps(manifest), check=check)

    # --- teardown ---------------------------------------------------------------------------

    def release_all(self) -> None:
        """Let every object go (strip finalizers), so a failed test leaves nothing Terminating."""
        with contextlib.suppress(ApiException):
            listed = self.custom.list_namespaced_custom_object(GROUP, VERSION, self.name, PLURAL)
            for item in listed.get("items", []):
                name = item["metadata"]["name"]
                with contextlib.suppress(ApiException):
                    self.custom.patch_namespaced_custom_object(
                        GROUP, VERSION, self.name, PLURAL, name, {"metadata": {"finalizers": None}}
                    )
                self.delete(name)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class AgentProcess:
    """`python -m blockpull.agent` as its own process, the way the DaemonSet runs it."""

    def __init__(
        self,
        cluster: Cluster,
        *,
        node: str,
        socket_dir: Path,
        namespace: str | None,
        log_path: Path,
        env: Mapping[str, str] | None = None,
    ) -> None:
        self.cluster = cluster
        self.node = node
        # Unique per process: the stand-in is shared by the session's tests.
        self.user = f"agent-{node}-{os.urandom(3).hex()}"
        self.socket_dir = socket_dir
        self.log_path = log_path
        self.port = free_port()
        self.metrics_port = free_port()
        self.env = {
            **{k: v for k, v in os.environ.items() if not k.startswith(("BLOCKPULL_", "KUBERNETES_"))},
            "KUBECONFIG": str(cluster.kubeconfig_for(self.user)),
            "NODE_NAME": node,
            "BLOCKPULL_SOCKET_TEMPLATE": f"{socket_dir}/{{namespace}}/{{vm}}.qmp",
            "BLOCKPULL_STATUS_INTERVAL": "0.5",
            "BLOCKPULL_POLL_INTERVAL": "0.25",
            "BLOCKPULL_PENDING_BACKOFF_MAX": "1",
            "BLOCKPULL_CONNECT_TIMEOUT": "2",
            "BLOCKPULL_COMMAND_TIMEOUT": "5",
            "BLOCKPULL_DELETE_TIMEOUT": "5",
            "BLOCKPULL_VM_GONE_GRACE": "3",
            "BLOCKPULL_LIVENESS_PORT": str(self.port),
            # Never the default (8081): agents of one test, or of other runs, would collide.
            "BLOCKPULL_METRICS_PORT": str(self.metrics_port),
            "BLOCKPULL_LOG_LEVEL": "DEBUG",
            "PYTHONUNBUFFERED": "1",
        }
        if namespace is not None:
            self.env["BLOCKPULL_WATCH_NAMESPACE"] = namespace
        self.env.update(env or {})
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def start(self, *, ready_timeout: float = 30.0) -> AgentProcess:
        assert self.proc is None or self.proc.poll() is not None, "already running"
        self.starts += 1
        log = self.log_path.open("ab")
        log.write(f"\n===== start {self.starts} =====\n".encode())
        log.flush()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "blockpull.agent"],
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()
        eventually(self._ready, timeout=ready_timeout, interval=0.1, what=f"agent {self.node} liveness")
        return self

    def _ready(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise AssertionError(f"agent {self.node} exited with {self.proc.returncode}:\n{self.log()}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/healthz", timeout=1) as answer:
                return bool(answer.status == 200)
        except OSError:
            return False

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self, sig: int = signal.SIGKILL, timeout: float = 30.0, *, wait: bool = True) -> int | None:
        """Send `sig`; wait for the exit unless `wait=False` (SIGSTOP, SIGCONT)."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.proc.wait(timeout) if wait else None

    def stop(self) -> int | None:
        """SIGTERM, the way the kubelet stops a pod; SIGKILL if it does not stop in time."""
        if self.proc is None or self.proc.poll() is not None:
            return None if self.proc is None else self.proc.returncode
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait(10)

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def writes(self) -> list[Any]:
        """The write requests this agent made (stand-in only)."""
        assert self.cluster.stand_in is not None
        return [r for r in self.cluster.stand_in.requests_by(user=self.user) if r.is_write]


def run_process(
    argv: list[str], env: Mapping[str, str], timeout: float = 30.0
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, env=dict(env), capture_output=True, text=True, timeout=timeout, check=False)


@contextlib.contextmanager
def silent_socket(path: Path) -> Iterator[socket.socket]:
    """A unix socket that accepts connections and never says a word (not a QEMU)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    server.listen(16)
    try:
        yield server
    finally:
        server.close()
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


class JobEvents:
    """QEMU's job events, recorded on a monitor of their own from a thread (tests are sync).

    Proves what happened inside QEMU whatever the agent says: how many jobs were created, when
    one concluded (QEMU's own timestamp)."""

    def __init__(self, socket_path: Path) -> None:
        import asyncio  # noqa: PLC0415
        import threading  # noqa: PLC0415

        from qemulab import QemuWatcher  # noqa: PLC0415

        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True, name="job-events")
        self._thread.start()
        self.watcher = QemuWatcher(socket_path, names={"JOB_STATUS_CHANGE", "BLOCK_JOB_COMPLETED"})
        asyncio.run_coroutine_threadsafe(self.watcher.start(), self._loop).result(10)

    def statuses(self, job_id: str) -> list[str]:
        return [status for status, _ in self.watcher.job_statuses(job_id)]

    def qemu_time(self, job_id: str, status: str) -> float | None:
        times = [
            ev.qemu_time
            for ev in self.watcher.events("JOB_STATUS_CHANGE", job_id=job_id)
            if ev.data.get("status") == status
        ]
        return times[-1] if times else None

    def close(self) -> None:
        import asyncio  # noqa: PLC0415

        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(self.watcher.stop(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()


AgentFactory = Callable[..., AgentProcess]
VMFactory = Callable[..., Any]


@contextlib.contextmanager
def chatty_socket(path: Path, greeting: bytes) -> Iterator[None]:
    """A unix socket that answers every connection with `greeting` and hangs up (not QEMU)."""
    import threading  # noqa: PLC0415

    path.parent.mkdir(parents=True, exist_ok=True)
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    server.listen(16)
    server.settimeout(0.2)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except OSError:
                continue
            with conn, contextlib.suppress(OSError):
                conn.sendall(greeting)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(5)
        server.close()
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


class Scrape:
    """One scrape of an agent's /metrics, parsed by the Prometheus client's own parser."""

    def __init__(self, agent: AgentProcess) -> None:
        url = f"http://127.0.0.1:{agent.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=5) as answer:
            assert answer.status == 200
            assert answer.headers["Content-Type"].startswith("text/plain")
            text = answer.read().decode()
        self.families = {f.name: f for f in text_string_to_metric_families(text)}

    def types(self) -> dict[str, str]:
        return {name: family.type for name, family in self.families.items()}

    def samples(self, family: str, sample: str | None = None) -> list[tuple[dict[str, str], float]]:
        return [
            (dict(s.labels), s.value)
            for s in self.families[family].samples
            if sample is None or s.name == sample
        ]

    def value(self, family: str, sample: str, **labels: str) -> float:
        (found,) = [v for got, v in self.samples(family, sample) if got == labels]
        return found
