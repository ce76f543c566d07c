"""`kubectl blockpull`, as a person or a script runs it: the real kubectl 1.32 finds the plugin on
PATH and runs it against the API (stand-in or `--cluster`), with the real agent and real QEMU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from harness import (
    AgentProcess,
    Namespace,
    VMFactory,
    assert_flattened,
    assert_intact,
    assert_no_jobs,
    eventually,
)

from qemulab import Chain, QemuVM

BIN = Path(sys.executable).parent  # the venv's bin: kubectl-blockpull is installed there
MiB = 1 << 20


def plugin_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("KUBECONFIG")}
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env.update(extra)
    return env


def argv(ns: Namespace, *args: str, kubeconfig: Path | None = None) -> list[str]:
    config = kubeconfig or ns.cluster.kubeconfig
    return ["kubectl", "blockpull", f"--kubeconfig={config}", "-n", ns.name, *args]


def run(
    ns: Namespace, *args: str, timeout: float = 90.0, kubeconfig: Path | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        argv(ns, *args, kubeconfig=kubeconfig),
        env=plugin_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def start(ns: Namespace, *args: str, kubeconfig: Path | None = None) -> subprocess.Popen[str]:
    return subprocess.Popen(
        argv(ns, *args, kubeconfig=kubeconfig),
        env=plugin_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


@pytest.fixture
def procs() -> Iterator[list[subprocess.Popen[str]]]:
    """Plugin processes a test started; killed at teardown if still running."""
    started: list[subprocess.Popen[str]] = []
    yield started
    for proc in started:
        if proc.poll() is None:
            proc.kill()
            proc.communicate(timeout=10)


def finish(proc: subprocess.Popen[str], timeout: float = 60.0) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


def job_id(ns: Namespace, name: str) -> str:
    return str(eventually(lambda: ns.status(name).get("jobId"), what=f"{name} jobId"))


# --- found by kubectl ---------------------------------------------------------------------------


def test_kubectl_finds_the_plugin_on_path() -> None:
    listed = subprocess.run(
        ["kubectl", "plugin", "list"], env=plugin_env(), capture_output=True, text=True, check=False
    )
    assert str(BIN / "kubectl-blockpull") in listed.stdout, listed.stdout + listed.stderr
    helped = subprocess.run(
        ["kubectl", "blockpull", "--help"], env=plugin_env(), capture_output=True, text=True, check=False
    )
    assert helped.returncode == 0
    for command in ("create", "wait", "watch", "abort", "--kubeconfig", "--context", "-A"):
        assert command in helped.stdout


# --- create --wait, wait ------------------------------------------------------------------------


def test_create_wait_follows_to_completed(
    ns: Namespace, agent: AgentProcess, chain4: Chain, vm_in: VMFactory
) -> None:
    vm = vm_in("web-1", [chain4])
    done = run(ns, "create", "web-1", str(chain4.top), "--node", "node-a", "--wait", "--timeout", "60s")
    assert done.returncode == 0, done.stderr
    created, completed = done.stdout.splitlines()
    assert created.startswith("blockpull.blockpull.dev/web-1-top-") and created.endswith(" created")
    name = created.split("/", 1)[1].removesuffix(" created")
    assert completed.startswith(f"blockpull.blockpull.dev/{name} Completed: "), completed
    assert ns.status(name)["phase"] == "Completed"
    assert done.stderr == ""  # not a terminal: no live view, nothing to say
    assert_no_jobs(vm)
    vm.stop_sync()
    assert_flattened(chain4)


def test_wait_returns_1_within_seconds_of_a_failure_and_124_on_timeout(
    ns: Namespace,
    agent: AgentProcess,
    slow_chain: Chain,
    vm_in: VMFactory,
    procs: list[subprocess.Popen[str]],
) -> None:
    vm: QemuVM = vm_in("web-1", [slow_chain])
    created = run(
        ns, "create", "web-1", str(slow_chain.top), "--node", "node-a", "--name", "slow", "--bandwidth", "1Mi"
    )
    assert created.stdout == "blockpull.blockpull.dev/slow created\n", created.stderr
    ns.wait_phase("slow", "Running")

    timed_out = run(ns, "wait", "slow", "--timeout", "2s")
    assert timed_out.returncode == 124
    assert timed_out.stdout == ""
    assert timed_out.stderr.startswith(
        "kubectl-blockpull: error: timed out after 2s waiting for slow (Running"
    )
    assert len(timed_out.stderr.splitlines()) == 1

    waiting = start(ns, "wait", "slow", "--timeout", "10m")
    procs.append(waiting)
    scripted = start(ns, "wait", "slow", "-o", "json")
    procs.append(scripted)
    time.sleep(1)
    assert waiting.poll() is None and scripted.poll() is None  # still running: nothing ended

    # The pull fails: someone cancels the QEMU job outside BlockPull.
    vm.execute_sync("job-cancel", {"id": job_id(ns, "slow")})
    ns.wait_phase("slow", "Failed")
    failed_at = time.monotonic()
    code, out, err = finish(waiting, timeout=30)
    assert time.monotonic() - failed_at < 10  # seconds, not the 10 minutes of its timeout
    assert code == 1, err
    assert out.startswith("blockpull.blockpull.dev/slow Failed at "), out
    assert ": Cancelled: the QEMU job was cancelled outside BlockPull" in out
    assert err == ""
    code, out, _ = finish(scripted, timeout=30)
    assert code == 1
    document = json.loads(out)
    assert document["kind"] == "List"
    assert [i["status"]["reason"] for i in document["items"]] == ["Cancelled"]
    vm.stop_sync()
    assert_intact(slow_chain)


def test_wait_for_several_is_0_once_all_completed(
    ns: Namespace, agent: AgentProcess, chain_factory: Callable[..., Chain], vm_in: VMFactory
) -> None:
    chains = [chain_factory(layers=3), chain_factory(layers=3)]
    vm = vm_in("web-1", chains)
    for index, chain in enumerate(chains):
        ns.create(f"d{index}", nodeName="node-a", vm="web-1", disk=str(chain.top))
    waited = run(ns, "wait", "d0", "d1", "--timeout", "60s")
    assert waited.returncode == 0, waited.stderr
    assert [line.split(" ")[:2] for line in waited.stdout.splitlines()] == [
        ["blockpull.blockpull.dev/d0", "Completed:"],
        ["blockpull.blockpull.dev/d1", "Completed:"],
    ]
    vm.stop_sync()
    for chain in chains:
        assert_flattened(chain)


# --- abort --------------------------------------------------------------------------------------


def test_abort_returns_once_gone_with_the_job_cancelled_and_the_chain_intact(
    ns: Namespace, agent: AgentProcess, slow_chain: Chain, vm_in: VMFactory
) -> None:
    vm = vm_in("web-1", [slow_chain])
    ns.create("abort-me", nodeName="node-a", vm="web-1", disk=str(slow_chain.top), bandwidth="1Mi")
    ns.wait_phase("abort-me", "Running")
    eventually(lambda: ns.status("abort-me").get("offset", 0) > 0, what="progress")
    jid = job_id(ns, "abort-me")
    aborted = run(ns, "abort", "abort-me", timeout=60)
    assert aborted.returncode == 0, aborted.stderr
    assert ns.get("abort-me") is None  # gone when it returned, not later
    assert vm.execute_sync("query-jobs") == []
    line = aborted.stdout.strip()
    assert line.startswith(f"blockpull.blockpull.dev/abort-me aborted: cancelled QEMU job {jid} at "), line
    assert line.endswith("; chain intact")
    assert aborted.stderr == ""
    vm.stop_sync()
    assert_intact(slow_chain)


def test_abort_of_a_finished_or_pending_object_says_nothing_was_cancelled(
    ns: Namespace, agent: AgentProcess, chain4: Chain, vm_in: VMFactory
) -> None:
    vm = vm_in("web-1", [chain4])
    ns.create("done", nodeName="node-a", vm="web-1", disk=str(chain4.top))
    ns.create("waiting", nodeName="node-a", vm="absent", disk="vda")
    ns.wait_phase("done", "Completed")
    ns.wait_reason("waiting", "Pending", "WaitingForVM")
    done = run(ns, "abort", "done", "-o", "json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["result"] == "completed"
    waiting = run(ns, "abort", "waiting")
    assert waiting.returncode == 0, waiting.stderr
    assert waiting.stdout == (
        "blockpull.blockpull.dev/waiting deleted before its job started (Pending: WaitingForVM); "
        "nothing ran in QEMU\n"
    )
    assert ns.get("done") is None and ns.get("waiting") is None
    assert_no_jobs(vm)


# --- watch --------------------------------------------------------------------------------------


def test_watch_of_several_is_0_when_all_completed_and_1_when_one_failed(
    ns: Namespace, agent: AgentProcess, chain_factory: Callable[..., Chain], vm_in: VMFactory
) -> None:
    chains = [chain_factory(layers=3, size=64 * MiB, pattern="spread", data_bytes=16 * MiB) for _ in range(2)]
    vm = vm_in("web-1", chains)
    for index, chain in enumerate(chains):
        ns.create(f"ok{index}", nodeName="node-a", vm="web-1", disk=str(chain.top), bandwidth="4Mi")
    watched = run(ns, "watch", timeout=120)
    assert watched.returncode == 0, watched.stderr
    lines = watched.stdout.splitlines()
    for name in ("ok0", "ok1"):
        running = [line for line in lines if line.startswith(f"{name} Running ")]
        assert len(running) >= 2, lines  # progress lines as it moved (at most one a second)
        assert lines.count(f"blockpull.blockpull.dev/{name} Completed: " + ns.status(name)["message"]) == 1
    vm.stop_sync()
    for chain in chains:
        assert_flattened(chain)


def test_watch_with_a_failure_is_1_and_names_the_reason(
    ns: Namespace, agent: AgentProcess, chain4: Chain, vm_in: VMFactory
) -> None:
    vm_in("web-1", [chain4])
    ns.create("good", nodeName="node-a", vm="web-1", disk=str(chain4.top), bandwidth="32Mi")
    ns.create("bad", nodeName="node-a", vm="web-1", disk="no-such-disk")
    watched = run(ns, "watch", "good", "bad", timeout=120)
    assert watched.returncode == 1, watched.stderr
    lines = watched.stdout.splitlines()
    assert any(
        line.startswith("blockpull.blockpull.dev/bad Failed") and ": DiskNotFound: " in line for line in lines
    )
    assert any(line.startswith("blockpull.blockpull.dev/good Completed: ") for line in lines), lines
    as_json = run(ns, "watch", "-o", "json")  # everything has an outcome now: one line each
    assert as_json.returncode == 1
    assert sorted(json.loads(line)["status"]["phase"] for line in as_json.stdout.splitlines()) == [
        "Completed",
        "Failed",
    ]


# --- a dropped watch ----------------------------------------------------------------------------


def test_dropped_expired_stalled_and_refused_watches_neither_end_nor_freeze_wait_and_watch(
    ns: Namespace,
    agent: AgentProcess,
    slow_chain: Chain,
    vm_in: VMFactory,
    procs: list[subprocess.Popen[str]],
) -> None:
    cluster = ns.cluster
    api = cluster.stand_in
    if api is None:
        pytest.skip("needs the stand-in to cut watches (a real cluster cannot be told to)")
    vm = vm_in("web-1", [slow_chain])
    ns.create("slow", nodeName="node-a", vm="web-1", disk=str(slow_chain.top), bandwidth="1Mi")
    ns.wait_phase("slow", "Running")
    users = {"wait": f"plugin-wait-{ns.name}", "watch": f"plugin-watch-{ns.name}"}
    configs = {cmd: cluster.kubeconfig_for(user) for cmd, user in users.items()}
    waiting = start(ns, "wait", "slow", "--request-timeout", "3s", kubeconfig=configs["wait"])
    watching = start(ns, "watch", "--request-timeout", "3s", kubeconfig=configs["watch"])
    procs += [waiting, watching]

    def requests(cmd: str, verb: str) -> int:
        return len(api.requests_by(user=users[cmd], verb=verb, resource="blockpulls"))

    def both(verb: str, at_least: int) -> bool:
        return all(requests(cmd, verb) >= at_least for cmd in users)

    eventually(lambda: both("watch", 1), what="both watching")
    # 1. The server ends every watch (as on an API server restart): resumed from where it was.
    api.call(api.server.hub.close_all)
    eventually(lambda: both("watch", 2), what="watches resumed")
    assert requests("wait", "list") == 1 and requests("watch", "list") == 1  # no re-listing needed
    # 2. The server forgets history (compaction): resuming is 410 Gone, so they list again.
    api.expire_watches()
    eventually(lambda: both("list", 2), what="re-listed after 410")
    # 3. The next watch requests stall (a black-holed connection), then two are refused (503).
    for user in users.values():
        api.inject_failures(user=user, verb="watch", status=None, delay=30, count=1)
        api.inject_failures(user=user, verb="watch", status=503, count=2)
    watches_before = {cmd: requests(cmd, "watch") for cmd in users}
    api.call(api.server.hub.close_all)
    eventually(
        lambda: all(requests(cmd, "watch") >= watches_before[cmd] + 4 for cmd in users),
        timeout=30,
        what="stalled and refused watches retried",
    )
    assert waiting.poll() is None and watching.poll() is None  # neither gave up

    # Still following: the pull's end is seen within seconds.
    ns.patch_spec("slow", bandwidth="512Mi")
    ns.wait_phase("slow", "Completed")
    completed_at = time.monotonic()
    code, out, err = finish(waiting, timeout=30)
    assert time.monotonic() - completed_at < 10
    assert code == 0, err
    assert out.startswith("blockpull.blockpull.dev/slow Completed: ")
    code, out, err = finish(watching, timeout=30)
    assert code == 0, err
    assert out.splitlines()[-1].startswith("blockpull.blockpull.dev/slow Completed: ")
    # The stalled connection was said once on stderr (not once per retry), then nothing.
    assert err.count("re-establishing the watch") == 1, err
    assert_no_jobs(vm)


# --- bad input ----------------------------------------------------------------------------------


def one_error_line(result: subprocess.CompletedProcess[str]) -> str:
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("kubectl-blockpull: error: ")
    return lines[0]


def test_bad_input_is_one_clear_line_and_exit_2(ns: Namespace, tmp_path: Path) -> None:
    ns.create("exists", nodeName="node-a", vm="web-1", disk="vda")
    for command in (["wait", "nope"], ["watch", "nope"], ["abort", "nope"]):
        result = run(ns, *command)
        assert result.returncode == 2
        assert one_error_line(result).endswith(
            f'blockpulls.blockpull.dev "nope" not found in namespace "{ns.name}"'
        )

    wrong = subprocess.run(
        ["kubectl", "blockpull", f"--kubeconfig={ns.cluster.kubeconfig}", "-n", "default", "wait", "exists"],
        env=plugin_env(),
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert wrong.returncode == 2
    assert one_error_line(wrong) == (
        'kubectl-blockpull: error: blockpulls.blockpull.dev "exists" not found in namespace "default" '
        f'(there is one in namespace "{ns.name}": use -n {ns.name})'
    )

    no_config = subprocess.run(
        ["kubectl", "blockpull", "wait", "exists"],
        env=plugin_env(KUBECONFIG=str(tmp_path / "missing"), HOME=str(tmp_path)),
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert no_config.returncode == 2
    assert "no kubeconfig" in one_error_line(no_config)

    for args, expected in (
        (["--context", "nope", "wait", "exists"], 'context "nope" does not exist'),
        (["wait", "exists", "-A"], "-A/--all-namespaces is for watch only"),
        (
            ["create", "web-1", "vda", "--node", "n", "--bandwidth", "fast"],
            "bandwidth 'fast' is not a quantity",
        ),
        (["create", "web-1", "vda"], "the following arguments are required: --node"),
        (["wait", "exists", "--timeout", "soon"], "invalid duration 'soon'"),
    ):
        result = run(ns, *args)
        assert result.returncode == 2, (args, result.stderr)
        assert expected in one_error_line(result)

    duplicate = run(ns, "create", "web-1", "vda", "--node", "node-a", "--name", "exists")
    assert duplicate.returncode == 2
    assert "already exists" in one_error_line(duplicate)


def test_unreachable_api_server_is_exit_3(ns: Namespace, tmp_path: Path) -> None:
    config = tmp_path / "kubeconfig"
    text = ns.cluster.kubeconfig.read_text()
    import re  # noqa: PLC0415

    config.write_text(re.sub(r"server: \S+", "server: http://127.0.0.1:9", text))
    result = run(ns, "wait", "x", kubeconfig=config)
    assert result.returncode == 3
    assert "cannot reach the API server" in one_error_line(result)


def test_abort_without_an_agent_times_out_with_124_and_says_what_to_do(
    ns: Namespace, agent: AgentProcess, slow_chain: Chain, vm_in: VMFactory
) -> None:
    vm_in("web-1", [slow_chain])
    ns.create("orphan", nodeName="node-a", vm="web-1", disk=str(slow_chain.top), bandwidth="1Mi")
    ns.wait_phase("orphan", "Running")
    eventually(lambda: ns.status("orphan").get("progress"), what="progress")
    agent.stop()  # nobody will release the finalizer
    result = run(ns, "abort", "orphan", "--timeout", "3s")
    assert result.returncode == 124
    line = one_error_line(result)
    assert "orphan is still being deleted (Running at " in line
    assert "is the blockpull agent of node node-a running?" in line
    assert """--type=merge -p '{"metadata":{"finalizers":null}}'""" in line
    assert ns.get("orphan") is not None  # still Terminating: the plugin removed nothing


def test_watch_all_namespaces_with_a_label_selector(
    ns: Namespace, agent: AgentProcess, chain4: Chain, vm_in: VMFactory
) -> None:
    vm_in("web-1", [chain4])
    manifest = ns.manifest("labelled", nodeName="node-a", vm="web-1", disk=str(chain4.top))
    manifest["metadata"]["labels"] = {"run": ns.name}
    ns.apply(manifest)
    ns.create("unlabelled", nodeName="node-a", vm="web-1", disk="vda")
    watched = run(ns, "watch", "-A", "-l", f"run={ns.name}", timeout=60)
    assert watched.returncode == 0, watched.stderr
    assert watched.stdout.splitlines()[-1].startswith(
        f"blockpull.blockpull.dev/labelled (namespace {ns.name}) Completed: "
    )
    assert "unlabelled" not in watched.stdout
    nothing = run(ns, "watch", "-l", "run=nobody")
    assert (nothing.returncode, nothing.stdout) == (0, "")
    assert nothing.stderr == f'No blockpulls matching run=nobody found in namespace "{ns.name}".\n'


def test_kubeconfig_env_list_context_and_its_namespace_as_kubectl(ns: Namespace, tmp_path: Path) -> None:
    import yaml  # noqa: PLC0415

    ns.create("exists", nodeName="node-a", vm="web-1", disk="vda")
    config = yaml.safe_load(ns.cluster.kubeconfig.read_text())
    current = next(c for c in config["contexts"] if c["name"] == config["current-context"])
    current["context"]["namespace"] = ns.name
    config["contexts"].append({"name": "other", "context": {**current["context"], "namespace": "default"}})
    path = tmp_path / "config"
    path.write_text(yaml.safe_dump(config))
    env = plugin_env(KUBECONFIG=f"{tmp_path / 'missing'}{os.pathsep}{path}", HOME=str(tmp_path))

    def plugin(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["kubectl", "blockpull", *args], env=env, capture_output=True, text=True, timeout=30, check=False
        )

    # No --kubeconfig, no -n: $KUBECONFIG's existing file, its current context's namespace.
    found = plugin("wait", "exists", "--timeout", "0")
    assert found.returncode == 124  # found, not finished (no agent), checked once
    assert (
        one_error_line(found)
        == "kubectl-blockpull: error: timed out after 0s waiting for exists (New); the pulls go on"
    )
    elsewhere = plugin("--context", "other", "wait", "exists")
    assert elsewhere.returncode == 2
    assert one_error_line(elsewhere).endswith(
        f'not found in namespace "default" (there is one in namespace "{ns.name}": use -n {ns.name})'
    )
