"""Fixtures of the operator tests: a cluster, a namespace per test, VMs and agent processes.

By default the cluster is the in-process API stand-in (`testapiserver`) with the project's CRD
loaded. With `pytest --cluster` it is the cluster in `$KUBECONFIG` (CRD installed beforehand);
every test then runs unchanged, with QEMU and the agent as processes on this machine.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from harness import CRD, AgentFactory, AgentProcess, Cluster, JobEvents, Namespace, VMFactory, socket_path

from qemulab import Chain, Disk, QemuVM
from qemulab.tmpdirs import remove_tree, short_tmpdir
from testapiserver import run_in_thread


@pytest.fixture(scope="session")
def cluster(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    workdir = tmp_path_factory.mktemp("cluster")
    if request.config.getoption("--cluster"):
        kubeconfig = os.environ.get("KUBECONFIG")
        if not kubeconfig:
            pytest.fail("--cluster needs KUBECONFIG naming the cluster to test against")
        real = Cluster(kubeconfig=Path(kubeconfig), workdir=workdir)
        yield real
        real.close()
        return
    server = run_in_thread()
    try:
        server.load_yaml(CRD)
        stand_in = Cluster(
            kubeconfig=server.write_kubeconfig(workdir / "kubeconfig-admin", user="admin"),
            workdir=workdir,
            stand_in=server,
        )
        yield stand_in
        stand_in.close()
    finally:
        server.stop()


@pytest.fixture
def ns(cluster: Cluster) -> Iterator[Namespace]:
    """A fresh namespace; its BlockPulls are let go (finalizers stripped) at teardown."""
    name = f"bp-{secrets.token_hex(3)}"
    namespace = Namespace(cluster, name)
    namespace.core.create_namespace({"metadata": {"name": name}})
    try:
        yield namespace
    finally:
        namespace.release_all()
        namespace.core.delete_namespace(name)


@pytest.fixture
def sockets() -> Iterator[Path]:
    """The agents' socket directory (short: unix socket paths are limited to 107 bytes)."""
    path = short_tmpdir("bps-")
    try:
        yield path
    finally:
        remove_tree(path)


@pytest.fixture
def agent_factory(
    cluster: Cluster, ns: Namespace, sockets: Path, tmp_path: Path, request: pytest.FixtureRequest
) -> Iterator[AgentFactory]:
    """`agent_factory(node="node-a", start=True, namespace=<test ns>, **env)`: agent processes.

    Each serves `namespace` only (so tests on a shared real cluster stay apart); their logs are
    printed when the test fails.
    """
    agents: list[AgentProcess] = []

    def factory(
        node: str = "node-a", *, start: bool = True, namespace: str | None = ns.name, **env: str
    ) -> AgentProcess:
        agent = AgentProcess(
            cluster,
            node=node,
            socket_dir=sockets,
            namespace=namespace,
            log_path=tmp_path / f"agent-{node}.log",
            env=env,
        )
        agents.append(agent)
        if start:
            agent.start()
        return agent

    try:
        yield factory
    finally:
        for agent in agents:
            agent.stop()
        if request.node.rep_call.failed if hasattr(request.node, "rep_call") else False:
            for agent in agents:
                print(f"----- agent {agent.node} log -----\n{agent.log()[-20000:]}")


@pytest.fixture
def agent(agent_factory: AgentFactory) -> AgentProcess:
    """The agent of node `node-a`, serving the test's namespace."""
    return agent_factory()


@pytest.fixture
def vm_in(vm_factory: Callable[..., QemuVM], sockets: Path, ns: Namespace) -> VMFactory:
    """`vm_in(name, disks, namespace=<test ns>, start=True, **QemuVM kwargs)`: a QEMU reachable
    by the agent, through a QMP monitor of its own at the socket template's path."""

    def factory(
        name: str, disks: list[Disk | Chain], *, namespace: str | None = None, **kwargs: Any
    ) -> QemuVM:
        path = socket_path(sockets, namespace or ns.name, name)
        path.parent.mkdir(parents=True, exist_ok=True)
        extra = [
            "-chardev", f"socket,id=bp,path={path},server=on,wait=off",
            "-mon", "chardev=bp,mode=control",
        ]  # fmt: skip
        return vm_factory(disks, extra_args=[*extra, *kwargs.pop("extra_args", [])], **kwargs)

    return factory


@pytest.fixture
def job_events() -> Iterator[Callable[[QemuVM], JobEvents]]:
    """`job_events(vm)`: QEMU's job events of a VM started with `extra_monitors=1`."""
    recorders: list[JobEvents] = []

    def factory(vm: QemuVM) -> JobEvents:
        recorder = JobEvents(vm.extra_sockets[0])
        recorders.append(recorder)
        return recorder

    yield factory
    for recorder in recorders:
        recorder.close()


@pytest.fixture
def slow_chain(chain_factory: Callable[..., Chain]) -> Chain:
    """Three layers, 32 MiB of data in the backing images: about 30 s at bandwidth 1Mi, so a
    test can act on a job while it runs (and then lift the limit to finish it)."""
    return chain_factory(layers=3, size=128 * MiB, pattern="spread", data_bytes=32 * MiB)


MiB = 1 << 20


@pytest.hookimpl(tryfirst=True, hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    # Lets fixtures see whether the test failed (to print the agents' logs).
    outcome = yield
    report = outcome.get_result()  # type: ignore[attr-defined]
    setattr(item, f"rep_{report.when}", report)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # Every operator test runs QEMU and the agent (`-m "not qemu"` deselects them).
    here = Path(__file__).parent
    for item in items:
        if here in Path(item.fspath).parents:
            item.add_marker(pytest.mark.qemu)
