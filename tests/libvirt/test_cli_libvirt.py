"""`blockpull --connect URI ... DOMAIN ...`: the node command on libvirt domains, as a real
process against the private libvirtd; same output shapes and exit codes as on QMP sockets."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from qemulab import Chain
from qemulab.patterns import MiB
from qemulab.pytest_plugin import ChainFactory
from virtlab import LibvirtDaemon, assert_flattened, assert_intact
from virtlab.pytest_plugin import DomainFactory

pytestmark = pytest.mark.libvirt

EXIT_OK, EXIT_TRANSIENT, EXIT_PERMANENT = 0, 3, 4


def blockpull(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    exe = shutil.which("blockpull") or f"{sys.prefix}/bin/blockpull"
    return subprocess.run(
        [exe, *args], capture_output=True, text=True, timeout=timeout, check=False, stdin=subprocess.DEVNULL
    )


def test_pull_chain_and_jobs(
    libvirtd_running: LibvirtDaemon, domain_factory: DomainFactory, chain4: Chain
) -> None:
    domain = domain_factory(chain4)
    uri = libvirtd_running.uri
    shown = blockpull("chain", "--connect", uri, domain.name, "vda", "-o", "json")
    assert shown.returncode == EXIT_OK, shown.stderr
    assert [i["filename"] for i in json.loads(shown.stdout)["images"]] == [
        str(p) for p in reversed(chain4.images)
    ]
    listed = blockpull("jobs", "--connect", uri, domain.name, "-o", "json")
    assert listed.returncode == EXIT_OK and json.loads(listed.stdout) == {"jobs": []}
    done = blockpull("pull", "--connect", uri, domain.name, "vda", "--base", "vda[3]", "-o", "json")
    assert done.returncode == EXIT_OK, done.stderr
    report = json.loads(done.stdout)
    assert report["result"] == "completed", report
    assert report["released_images"] == [str(chain4.images[2])]
    assert_flattened(domain, chain4, keep=2)
    done = blockpull("pull", "-c", uri, domain.name, str(chain4.top))
    assert done.returncode == EXIT_OK, done.stderr
    assert_flattened(domain, chain4)


def test_abort_a_running_pull(
    libvirtd_running: LibvirtDaemon, domain_factory: DomainFactory, chain_factory: ChainFactory
) -> None:
    chain = chain_factory(layers=4, size=64 * MiB, pattern="spread", data_bytes=24 * MiB)
    domain = domain_factory(chain)
    uri = libvirtd_running.uri
    started = blockpull("pull", "-c", uri, domain.name, "vda", "--bandwidth", "1Mi", "--no-wait")
    assert started.returncode == EXIT_OK, started.stderr
    listed = json.loads(blockpull("jobs", "-c", uri, domain.name, "-o", "json").stdout)["jobs"]
    assert [j["id"] for j in listed] == [f"{domain.name}/vda"]
    aborted = blockpull("abort", "-c", uri, domain.name, f"{domain.name}/vda")
    assert aborted.returncode == EXIT_OK, aborted.stderr
    assert_intact(domain, chain)


def test_exit_codes(
    libvirtd_running: LibvirtDaemon, domain_factory: DomainFactory, chain4: Chain, short_tmp: Path
) -> None:
    domain = domain_factory(chain4)
    uri = libvirtd_running.uri
    absent = blockpull("pull", "-c", uri, "lab_nosuchvm", "vda", "-o", "json")
    assert (
        absent.returncode == EXIT_TRANSIENT and json.loads(absent.stdout)["error"]["reason"] == "WaitingForVM"
    )
    bad_disk = blockpull("pull", "-c", uri, domain.name, "vdz")
    assert bad_disk.returncode == EXIT_PERMANENT and "vdz" in bad_disk.stderr
    bad_base = blockpull("pull", "-c", uri, domain.name, "vda", "--base", "vda[9]")
    assert bad_base.returncode == EXIT_PERMANENT
    no_daemon = blockpull(
        "jobs", "-c", f"qemu+unix:///system?socket={short_tmp}/none", domain.name, "-o", "json"
    )
    assert no_daemon.returncode == EXIT_TRANSIENT
    assert json.loads(no_daemon.stdout)["error"]["reason"] == "LibvirtUnavailable"
    assert_intact(domain, chain4)


def test_a_pull_rides_out_a_libvirtd_restart(
    libvirtd_running: LibvirtDaemon, domain_factory: DomainFactory, chain_factory: ChainFactory
) -> None:
    """libvirtd restarted mid-job (an upgrade): QEMU and the job go on, and so does the
    command, once, on stderr, saying so; it then concludes the job as usual."""
    chain = chain_factory(layers=3, size=64 * MiB, pattern="spread", data_bytes=16 * MiB)
    domain = domain_factory(chain)
    uri = libvirtd_running.uri
    exe = shutil.which("blockpull") or f"{sys.prefix}/bin/blockpull"
    pull = subprocess.Popen(
        [exe, "pull", "-c", uri, domain.name, "vda", "--bandwidth", "2Mi", "-q"],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        while not json.loads(blockpull("jobs", "-c", uri, domain.name, "-o", "json").stdout)["jobs"]:
            assert pull.poll() is None and time.monotonic() < deadline, "the job never started"
            time.sleep(0.1)
        libvirtd_running.terminate()  # SIGTERM: the job and QEMU go on
        time.sleep(2)  # the command meets the closed connection while the job runs
        assert pull.poll() is None, pull.communicate()
        libvirtd_running.start_libvirtd()
        out, err = pull.communicate(timeout=120)
    finally:
        if pull.poll() is None:
            pull.kill()
            pull.communicate()
    assert pull.returncode == EXIT_OK, err
    assert err.count("the job goes on, waiting for it") == 1, err
    assert "completed" in out, out
    assert_flattened(domain, chain)
