"""Nothing is lost: the backing link goes only after the copied data is on disk.

QEMU 7.2 rewrites the image header at job finalization while the copied clusters' metadata
may still sit in its cache; a QEMU killed then leaves a disk that reads zeros where the
template's data was. Jobs are held at `pending` (auto-finalize off) until the agent flushes,
finalizes and flushes again. Each case kills QEMU with SIGKILL at the worst moment and checks
the images right after it died, as their own headers chain them (`qemu-img compare` against
the guest's data, `qemu-img check`), before anything re-attaches the chain.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from harness import AgentProcess, JobEvents, Namespace, VMFactory, assert_flattened, assert_intact, eventually

from qemulab import Chain, QemuVM


def test_agent_killed_job_finishes_qemu_killed_nothing_lost_then_the_pull_completes(
    ns: Namespace,
    agent: AgentProcess,
    slow_chain: Chain,
    vm_in: VMFactory,
    job_events: Callable[[QemuVM], JobEvents],
) -> None:
    vm = vm_in("web-1", [slow_chain], extra_monitors=1)
    events = job_events(vm)
    ns.create("lossless", nodeName="node-a", vm="web-1", disk=vm.disks[0].top, bandwidth="1Mi")
    job_id = ns.wait_phase("lossless", "Running")["jobId"]
    agent.kill()  # SIGKILL mid-job: an OOM kill, a crash, a rollout

    # The job finishes while nobody is there: it waits at `pending`, chain unchanged.
    vm.execute_sync("block-job-set-speed", {"device": job_id, "speed": 0})
    eventually(lambda: "pending" in events.statuses(job_id), timeout=30, what="job pending in QEMU")
    time.sleep(0.5)
    assert [j["status"] for j in vm.execute_sync("query-jobs")] == ["pending"]
    status = ns.status("lossless")
    assert status["phase"] == "Running" and "releasedImages" not in status

    vm.kill()  # SIGKILL QEMU before anyone finalized
    assert_intact(slow_chain)  # the guest's data, through the chain the headers name

    vm.start_sync()  # the same images and sockets, the chain attached as before
    agent.start()
    # QEMU lost the job with its process; the disk still needs its backing images, so the
    # agent starts the pull again (cheap: the copied data is in the top image).
    done = ns.wait_phase("lossless", "Completed", "Failed", timeout=60)
    assert done["phase"] == "Completed", done
    assert done["releasedImages"] == [str(p) for p in reversed(slow_chain.images[:-1])]
    vm.kill()  # and QEMU dies again the moment the object says Completed
    assert_flattened(slow_chain)  # stands alone, with the guest's data
    assert "Restarted" in ns.event_reasons("lossless")


def test_completed_is_written_only_once_the_flattened_disk_is_on_disk(
    ns: Namespace, agent: AgentProcess, chain_factory: Callable[..., Chain], vm_in: VMFactory
) -> None:
    chain = chain_factory(layers=3, size=64 * MiB, pattern="spread", data_bytes=16 * MiB)
    vm = vm_in("web-1", [chain])
    ns.create("normal", nodeName="node-a", vm="web-1", disk=vm.disks[0].top)
    # Poll fast and kill QEMU the moment the object says Completed (and names released images).
    deadline = time.monotonic() + 60
    while True:
        status = ns.status("normal")
        if status.get("releasedImages") is not None or status.get("phase") in ("Completed", "Failed"):
            break
        assert time.monotonic() < deadline, status
        time.sleep(0.01)
    vm.kill()
    assert status["phase"] == "Completed", status
    assert_flattened(chain)


def test_vm_shut_down_right_after_completed_keeps_the_pulled_disk(
    ns: Namespace, agent: AgentProcess, chain_factory: Callable[..., Chain], vm_in: VMFactory
) -> None:
    chain = chain_factory(layers=3, size=64 * MiB, pattern="spread", data_bytes=16 * MiB)
    vm = vm_in("web-1", [chain])
    ns.create("shutdown", nodeName="node-a", vm="web-1", disk=vm.disks[0].top, base=str(chain.images[0]))
    done = ns.wait_phase("shutdown", "Completed", "Failed")
    assert done["phase"] == "Completed", done
    assert done["releasedImages"] == [str(chain.images[1])]
    vm.stop_sync()  # an orderly shutdown right after
    assert_flattened(chain, keep=1)


MiB = 1 << 20
