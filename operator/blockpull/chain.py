"""Reading a VM's block graph safely and resolving a disk and a base in it.

Owns: turning what the user wrote (`disk`: node-name, drive id, guest device id or the active
image's path; `base`: node-name or image path) into QEMU node names and the disk's backing
chain, without ever sending a query that can crash QEMU.

The trap: QEMU 7.2 dies (SIGSEGV, the VM with it) on `query-named-block-nodes` while a stream
job is `concluded` and not yet dismissed. So we only send it when no job can be in or reach that
state on its own: every job paused, or `pending` with `auto-finalize: false` (measured: listing
nodes then is safe, the job's filter is still in the graph; only `job-finalize` or a cancel moves
it on), or none at all. This runs under the connection's `graph_lock`, which our own job
commands that can conclude a held job (start, resume, cancel, finalize, dismiss) also take.
Otherwise we rely on the always-safe `query-block` and `x-debug-query-block-graph` plus the
node details remembered from the last safe read; a node we know nothing about then raises
`InspectionUnsafe` (retry later) instead of risking the VM.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from blockpull.errors import BaseNotInChain, DiskBusy, DiskNotFound, InspectionUnsafe
from blockpull.qmp import QMPConnection

#: Drivers that sit above a format node without being an image of the chain.
FILTER_DRIVERS = frozenset(
    {"copy-on-read", "throttle", "preallocate", "compress", "blklogwrites", "snapshot-access"}
)
#: Job states from which QEMU cannot move to `concluded` on its own.
_STILL_JOB_STATES = frozenset({"paused", "standby", "null"})
#: ...and this one, for a block job started with `auto-finalize: false` (it waits for us).
_HELD_STATE = "pending"


@dataclass(frozen=True)
class Image:
    """One qcow2 (or other format) image of a backing chain."""

    node_name: str
    filename: str
    driver: str
    #: The backing file name as recorded in this image's header (may be relative), if any.
    backing_name: str | None
    virtual_size: int


@dataclass(frozen=True)
class DiskChain:
    """A disk as QEMU sees it now: its active image first, then each backing image below it."""

    requested: str
    images: tuple[Image, ...]

    @property
    def top(self) -> Image:
        return self.images[0]

    @property
    def device(self) -> str:
        """What `block-stream`'s `device` argument gets: the active image's node name."""
        return self.top.node_name

    def find_base(self, base: str) -> int:
        """Index in `images` of the image `base` names (a node name or a path)."""
        for index, image in enumerate(self.images):
            if base in (image.node_name, image.filename) or _same_path(base, image.filename):
                if index == 0:
                    raise BaseNotInChain(
                        f"base {base!r} is the disk {self.requested!r} itself, not an image below it"
                    )
                return index
        chain = " -> ".join(image.filename for image in self.images)
        raise BaseNotInChain(f"base {base!r} is not in the backing chain of {self.requested!r}: {chain}")

    def released_by(self, base_index: int | None) -> list[str]:
        """Images the disk no longer needs once streamed down to `base_index` (None: all)."""
        stop = len(self.images) if base_index is None else base_index
        return [image.filename for image in self.images[1:stop]]

    def backing_name_for(self, base_index: int) -> str:
        """The name to write into the active image's header so it points at the base.

        Keeps a relative name relative (what `qemu-img rebase` users and `virsh blockpull
        --keep-relative` expect), and never lets QEMU write its `json:{...}` pseudo-filename.
        """
        base = self.images[base_index]
        recorded = self.images[base_index - 1].backing_name
        if recorded and not recorded.startswith("json:"):
            if os.path.isabs(recorded):
                return recorded
            above_dir = os.path.dirname(self.images[base_index - 1].filename)
            top_dir = os.path.dirname(self.top.filename)
            if os.path.normpath(above_dir) == os.path.normpath(top_dir):
                return recorded
            return os.path.relpath(os.path.join(above_dir, recorded), top_dir or ".")
        return base.filename


@dataclass
class _Node:
    node_id: int
    name: str
    kind: str  # block-backend | block-driver | block-job
    children: dict[str, int] = field(default_factory=dict)


@dataclass
class BlockGraph:
    """A snapshot of QEMU's block graph with the details we need per format node."""

    nodes: dict[int, _Node]
    by_name: dict[str, int]
    details: dict[str, Mapping[str, Any]]  # node-name -> query-named-block-nodes entry
    backends: list[Mapping[str, Any]]  # query-block
    complete: bool  # details came from a fresh query-named-block-nodes

    def driver(self, node_name: str) -> str | None:
        info = self.details.get(node_name)
        return str(info["drv"]) if info else None

    def child(self, node_name: str, edge: str) -> str | None:
        node_id = self.by_name.get(node_name)
        if node_id is None:
            return None
        child_id = self.nodes[node_id].children.get(edge)
        return self.nodes[child_id].name if child_id is not None else None

    def parents(self, node_name: str, edge: str) -> list[str]:
        node_id = self.by_name.get(node_name)
        return [
            n.name for n in self.nodes.values() if node_id is not None and n.children.get(edge) == node_id
        ]


async def read_graph(conn: QMPConnection) -> BlockGraph:
    """Read the block graph, sending `query-named-block-nodes` only when it cannot crash QEMU.

    Callers hold `conn.graph_lock` so that our own job starts and dismissals cannot interleave.
    """
    # Pipelined: one round trip instead of three (QEMU still runs them in this order).
    backends_raw, raw, jobs, block_jobs = await asyncio.gather(
        conn.execute("query-block"),
        conn.execute("x-debug-query-block-graph"),
        conn.execute("query-jobs"),
        conn.execute("query-block-jobs"),
    )
    backends = list(backends_raw)
    nodes = {int(n["id"]): _Node(int(n["id"]), str(n["name"]), str(n["type"])) for n in raw["nodes"]}
    for edge in raw["edges"]:
        nodes[int(edge["parent"])].children[str(edge["name"])] = int(edge["child"])
    by_name = {n.name: n.node_id for n in nodes.values() if n.kind == "block-driver" and n.name}

    cache = conn.node_cache
    complete = nodes_query_is_safe(jobs, block_jobs)
    if complete:
        fresh = await conn.execute("query-named-block-nodes", {"flat": True})
        cache.clear()
        cache.update({str(info["node-name"]): info for info in fresh})
    details = dict(cache)
    for backend in backends:
        _add_backend_details(details, backend, nodes, by_name)
    return BlockGraph(nodes, by_name, details, backends, complete)


def nodes_query_is_safe(jobs: Iterable[Mapping[str, Any]], block_jobs: Iterable[Mapping[str, Any]]) -> bool:
    """True when no job exists that could reach `concluded` during the next command.

    `jobs` is `query-jobs`, `block_jobs` is `query-block-jobs` (only it says `auto-finalize`).
    """
    held = {str(job.get("device")) for job in block_jobs if job.get("auto-finalize") is False}
    return all(
        str(job["status"]) in _STILL_JOB_STATES or (job["status"] == _HELD_STATE and str(job["id"]) in held)
        for job in jobs
    )


def _add_backend_details(
    details: dict[str, Mapping[str, Any]],
    backend: Mapping[str, Any],
    nodes: dict[int, _Node],
    by_name: dict[str, int],
) -> None:
    """Fill in details for a device's chain from `query-block`, which is always safe.

    `query-block` nests each backing image's info under `backing-image` without node names;
    the graph's `backing` edges give the node names in the same order.
    """
    inserted = backend.get("inserted")
    if not inserted:
        return
    node_name = str(inserted.get("node-name", ""))
    image: Mapping[str, Any] | None = inserted.get("image")
    if node_name not in details:
        details[node_name] = {
            "node-name": node_name,
            "drv": inserted.get("drv"),
            "file": inserted.get("file"),
            "image": image or {},
        }
    current = node_name
    while image is not None and current in by_name:
        node = nodes[by_name[current]]
        backing_id = node.children.get("backing")
        image = image.get("backing-image")
        if backing_id is None or image is None:
            return
        current = nodes[backing_id].name
        if current not in details:
            details[current] = {
                "node-name": current,
                "drv": image.get("format"),
                "file": image.get("filename"),
                "image": image,
            }


async def read_chain(conn: QMPConnection, disk: str) -> DiskChain:
    """Resolve `disk` and return its backing chain (active image first)."""
    async with conn.graph_lock:
        graph = await read_graph(conn)
    return resolve_disk(graph, disk)


async def job_device(conn: QMPConnection, job_id: str) -> str | None:
    """The node a stream job writes into (its "active node" edge), while QEMU still links it.

    Only `x-debug-query-block-graph`, which is safe in every job state. None once the job has
    let go of its nodes (concluded) or when QEMU has no such job.
    """
    raw = await conn.execute("x-debug-query-block-graph")
    names = {int(n["id"]): str(n["name"]) for n in raw["nodes"]}
    job_ids = {int(n["id"]) for n in raw["nodes"] if n["type"] == "block-job" and n["name"] == job_id}
    for edge in raw["edges"]:
        if int(edge["parent"]) in job_ids and edge["name"] == "active node":
            return names.get(int(edge["child"])) or None
    return None


async def jobs_holding(conn: QMPConnection, disk: str) -> list[str]:
    """Ids of the block jobs that hold a node of `disk` (its chain, or filters above it)."""
    async with conn.graph_lock:
        graph = await read_graph(conn)
    return _jobs_using(graph, _find_top(graph, disk))


def resolve_disk(graph: BlockGraph, disk: str) -> DiskChain:
    top = _find_top(graph, disk)
    return DiskChain(requested=disk, images=tuple(_walk_chain(graph, top, disk)))


def _find_top(graph: BlockGraph, disk: str) -> str:
    # 1. A block node name. A protocol node names its format node (the one using it as file).
    if disk in graph.by_name:
        node = _skip_filters(graph, disk)
        if _is_format_node(graph, node):
            return node
        for parent in graph.parents(node, "file"):
            if _is_format_node(graph, parent):
                return parent
    # 2. A drive id, 3. a guest device (qdev) id.
    for backend in graph.backends:
        if not backend.get("inserted"):
            continue
        qdev = str(backend.get("qdev", ""))
        if disk in (backend.get("device"), qdev) or _qdev_matches(qdev, disk):
            return _skip_filters(graph, str(backend["inserted"]["node-name"]))
    # 4. The absolute path of the disk's active image.
    if os.path.isabs(disk):
        matches = [
            name
            for name in graph.by_name
            if _is_format_node(graph, name) and _same_path(disk, _filename(graph, name))
        ]
        active = [name for name in matches if not graph.parents(name, "backing")]
        if active:
            return active[0]
        if matches:
            above = graph.parents(matches[0], "backing")
            raise DiskNotFound(
                f"{disk} is a backing image (below node {above[0]!r}), not a disk's active image"
            )
    if not graph.complete and disk not in graph.details:
        raise InspectionUnsafe(
            f"cannot resolve disk {disk!r} yet: another block job runs on this VM, and QEMU 7.2 "
            "can crash if asked to list its block nodes while a job may end; will retry once no "
            "job can end unseen (paused, held at pending, or gone)"
        )
    raise DiskNotFound(
        f"QEMU has no disk {disk!r} (not a node-name, drive id, device id or active image path)"
    )


def _walk_chain(graph: BlockGraph, top: str, disk: str) -> Iterable[Image]:
    current: str | None = top
    seen: set[str] = set()
    while current is not None and current not in seen:
        seen.add(current)
        current = _skip_filters(graph, current)
        info = graph.details.get(current)
        if info is None:
            jobs = _jobs_using(graph, top)
            if jobs:
                # A job holds this disk (and put its own nodes into the chain): whoever asked
                # must wait for it, which is what "busy" means to them.
                raise DiskBusy(
                    f"disk {disk!r} is busy with block job {', '.join(jobs)}; try again once it has ended"
                )
            raise InspectionUnsafe(
                f"no details for block node {current!r} of disk {disk!r} yet: another block job "
                "runs on this VM (QEMU 7.2 can crash if asked to list its block nodes then); will retry"
            )
        image: Mapping[str, Any] = info.get("image") or {}
        yield Image(
            node_name=current,
            filename=_filename(graph, current),
            driver=str(info.get("drv")),
            backing_name=_str_or_none(image.get("backing-filename")),
            virtual_size=int(image.get("virtual-size", 0)),
        )
        current = graph.child(current, "backing")


def _jobs_using(graph: BlockGraph, top: str) -> list[str]:
    """Ids of the block jobs with an edge to a node of the disk (its chain or filters above)."""
    disk_nodes: set[int] = set()
    pending = [graph.by_name[top]] if top in graph.by_name else []
    while pending:  # everything below the top ...
        node_id = pending.pop()
        if node_id not in disk_nodes:
            disk_nodes.add(node_id)
            pending.extend(graph.nodes[node_id].children.values())
    above = [graph.by_name[top]] if top in graph.by_name else []
    while above:  # ... and the filters (and backends) above it
        node_id = above.pop()
        for node in graph.nodes.values():
            if (
                node.kind != "block-job"
                and node_id in node.children.values()
                and node.node_id not in disk_nodes
            ):
                disk_nodes.add(node.node_id)
                above.append(node.node_id)
    return sorted(
        node.name
        for node in graph.nodes.values()
        if node.kind == "block-job" and disk_nodes.intersection(node.children.values())
    )


def _skip_filters(graph: BlockGraph, name: str) -> str:
    while graph.driver(name) in FILTER_DRIVERS:
        below = graph.child(name, "file") or graph.child(name, "backing")
        if below is None:
            break
        name = below
    return name


def _is_format_node(graph: BlockGraph, name: str) -> bool:
    # A format node has a `file` child; a protocol node (file, host_device, blkdebug's image)
    # has none, or only `image` (blkdebug).
    driver = graph.driver(name)
    if driver is not None and driver in FILTER_DRIVERS:
        return False
    return graph.child(name, "file") is not None and driver not in ("blkdebug", "raw-protocol")


def _filename(graph: BlockGraph, name: str) -> str:
    """The image file's path: from the protocol node below, when QEMU reports `json:{...}`."""
    info = graph.details.get(name, {})
    filename = str(info.get("file", ""))
    node: str | None = name
    while filename.startswith("json:") or not filename:
        node = graph.child(node, "file") or graph.child(node, "image") if node else None
        if node is None:
            break
        filename = str(graph.details.get(node, {}).get("file", ""))
    return filename


def _qdev_matches(qdev: str, device_id: str) -> bool:
    # QEMU 7.2 reports e.g. "/machine/peripheral/vda/virtio-backend" for -device ...,id=vda.
    return qdev == f"/machine/peripheral/{device_id}" or qdev.startswith(f"/machine/peripheral/{device_id}/")


def _same_path(a: str, b: str) -> bool:
    if not b or b.startswith("json:"):
        return False
    return os.path.normpath(a) == os.path.normpath(b) or os.path.realpath(a) == os.path.realpath(b)


def _str_or_none(value: object) -> str | None:
    return str(value) if value else None
