"""The console script `kubectl-blockpull`: `create`, `wait`, `watch` and `abort`.

Owns running each command and its exit status. Following objects (`follow`) is one loop for
`wait`, `watch` and `create --wait`: the watcher thread's items are applied to `Followed`, a
display shows them, and the loop ends on the command's rule (wait: 1 as soon as one failed;
watch: when all have an outcome), on `--timeout` (124) or on a signal (128+N). Nothing is
ever cancelled by the plugin except by `abort`: a timeout or Ctrl-C leaves the pulls running.

Results go to stdout (`blockpull.blockpull.dev/NAME Completed: ...`), errors to stderr as one
line, `kubectl-blockpull: error: ...`.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import re
import signal
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from types import FrameType
from typing import Any, Protocol, TextIO

import kubernetes
from kubernetes.client.exceptions import ApiException
from urllib3.exceptions import HTTPError

from blockpull.kubectl import args as cli_args
from blockpull.kubectl import render
from blockpull.kubectl.config import (
    EXIT_FAILED,
    EXIT_INTERNAL,
    EXIT_OK,
    EXIT_SIGNAL_BASE,
    EXIT_TIMEOUT,
    GROUP,
    KIND_PREFIX,
    PLURAL,
    RESOURCE,
    VERSION,
    PluginError,
    Target,
    api_error,
    resolve,
)
from blockpull.kubectl.model import Followed, Key, Outcome, Pull, Tracked
from blockpull.kubectl.watch import Changed, Fatal, Listed, Recovered, Scope, Trouble, Watcher

PROG = "kubectl-blockpull"
#: The live view is redrawn at most this often on changes, and at least once a second (ETA).
FRAME_INTERVAL = 0.1
TICK = 1.0
#: Plain lines: at most one progress line per object per this many seconds.
PLAIN_INTERVAL = 1.0
#: After an abort: how long to look for the agent's Event saying how the cancel went.
EVENT_GRACE = 3.0
_DECISIVE_EVENTS = ("Cancelled", "Completed", "Failed", "AbortUnconfirmed", "CancelTimeout", "AbortTimeout")


class Interrupted(Exception):
    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


# --- displays ---------------------------------------------------------------------------------


class Display(Protocol):
    def open(self, followed: Followed) -> None: ...

    def changed(self, followed: Followed, keys: set[Key]) -> None: ...

    def tick(self, followed: Followed) -> None: ...

    def trouble(self, message: str | None) -> None: ...

    def close(self, followed: Followed) -> None: ...


class Quiet:
    """`wait` in scripts: nothing until the outcome; a broken watch is said once on stderr."""

    def __init__(self, err: TextIO) -> None:
        self._err = err

    def open(self, followed: Followed) -> None:
        pass

    def changed(self, followed: Followed, keys: set[Key]) -> None:
        pass

    def tick(self, followed: Followed) -> None:
        pass

    def trouble(self, message: str | None) -> None:
        if message:
            warning(self._err, message)

    def close(self, followed: Followed) -> None:
        pass


class Live:
    """The live view on a terminal: a bar per object, redrawn whole on each frame."""

    def __init__(self, stream: TextIO, title: str, *, with_namespace: bool) -> None:
        self._screen = render.LiveScreen(stream)
        self._title = title
        self._with_namespace = with_namespace
        self._note: str | None = None
        self._drawn_at = 0.0
        self._dirty = False

    def open(self, followed: Followed) -> None:
        self._screen.open()
        self._draw(followed)

    def changed(self, followed: Followed, keys: set[Key]) -> None:
        self._dirty = True
        if time.monotonic() - self._drawn_at >= FRAME_INTERVAL:
            self._draw(followed)

    def tick(self, followed: Followed) -> None:
        # At most FRAME_INTERVAL apart however fast changes come; at once after a resize; once a
        # second anyway (a size change that came without SIGWINCH, e.g. while stopped).
        since = time.monotonic() - self._drawn_at
        if self._screen.take_resize() or (self._dirty and since >= FRAME_INTERVAL) or since >= TICK:
            self._draw(followed)

    def trouble(self, message: str | None) -> None:
        self._note = f"watch: {message}" if message else None
        self._dirty = True

    def _draw(self, followed: Followed) -> None:
        width, height = self._screen.size()
        counts = render.summary(list(followed.objects.values()))
        title = f"{self._title}: {counts}"
        self._screen.draw(
            render.live_frame(
                followed.ordered(),
                width=width,
                height=height,
                title=title,
                note=self._note,
                with_namespace=self._with_namespace,
            )
        )
        self._drawn_at = time.monotonic()
        self._dirty = False

    def close(self, followed: Followed) -> None:
        self._screen.close()


class Plain:
    """`watch` into a pipe or log: a line per change, progress at most once a second per object,
    an outcome line as soon as an object has one."""

    def __init__(self, out: TextIO, err: TextIO, *, with_namespace: bool) -> None:
        self._out = out
        self._err = err
        self._with_namespace = with_namespace
        #: Per object: the last line written, the state it showed, and when.
        self._last: dict[Key, tuple[str, str, float]] = {}
        self._pending: set[Key] = set()  # progress held back by the once-a-second limit

    def open(self, followed: Followed) -> None:
        self.changed(followed, set(followed.objects))

    def changed(self, followed: Followed, keys: set[Key]) -> None:
        now = time.monotonic()
        for key in sorted(keys | self._pending):
            tracked = followed.objects.get(key)
            if tracked is None:
                continue
            state = render.state_word(tracked)
            if tracked.outcome is not None:
                line = render.outcome_line(tracked, with_namespace=self._with_namespace)
            else:
                line = render.plain_line(tracked, with_namespace=self._with_namespace)
            last = self._last.get(key)
            if last is not None and last[0] == line:
                self._pending.discard(key)
                continue
            # Only more progress waits for its second; a change of state is written at once.
            if last is not None and state == last[1] == "Running" and now - last[2] < PLAIN_INTERVAL:
                self._pending.add(key)
                continue
            self._out.write(line + "\n")
            self._last[key] = (line, state, now)
            self._pending.discard(key)
        self._out.flush()

    def tick(self, followed: Followed) -> None:
        if self._pending:
            self.changed(followed, set())

    def trouble(self, message: str | None) -> None:
        if message:
            warning(self._err, message)

    def close(self, followed: Followed) -> None:
        if self._pending:
            self.changed(followed, set())


class JsonLines:
    """`watch -o json`: every change of an object as one JSON object on its own line."""

    def __init__(self, out: TextIO, err: TextIO) -> None:
        self._out = out
        self._err = err

    def open(self, followed: Followed) -> None:
        self.changed(followed, set(followed.objects))

    def changed(self, followed: Followed, keys: set[Key]) -> None:
        for key in sorted(keys):
            tracked = followed.objects.get(key)
            if tracked is not None:
                self._out.write(json.dumps(_document(tracked), separators=(",", ":")) + "\n")
        self._out.flush()

    def tick(self, followed: Followed) -> None:
        pass

    def trouble(self, message: str | None) -> None:
        if message:
            warning(self._err, message)

    def close(self, followed: Followed) -> None:
        pass


def _document(tracked: Tracked) -> dict[str, Any]:
    doc = dict(tracked.pull.raw)
    doc.setdefault("apiVersion", f"{GROUP}/{VERSION}")
    doc.setdefault("kind", "BlockPull")
    return doc


# --- following ----------------------------------------------------------------------------------


def follow(
    target: Target,
    scope: Scope,
    followed: Followed,
    display: Display,
    *,
    stop_on_failure: bool,
    deadline: float | None,
    first: Listed | None = None,
) -> int | None:
    """Follow until the rule is met: EXIT_OK / EXIT_FAILED, or None when the deadline passed."""
    watcher = Watcher(target, scope)
    if first is None:
        first = watcher.list_now()
        followed.snapshot(first.items, time.monotonic())
        _check_missing(target, followed, scope)
    watcher.start(first.resource_version)
    try:
        display.open(followed)
        while True:
            verdict = _verdict(followed, stop_on_failure=stop_on_failure)
            if verdict is not None:
                return verdict
            now = time.monotonic()
            if deadline is not None and now >= deadline:
                return None
            wait = TICK / 4 if deadline is None else max(0.0, min(TICK / 4, deadline - now))
            try:
                item = watcher.items.get(timeout=wait)
            except queue.Empty:
                display.tick(followed)
                continue
            now = time.monotonic()
            if isinstance(item, Changed):
                key = followed.event(item.kind, item.obj, now)
                if key is not None:
                    display.changed(followed, {key})
            elif isinstance(item, Listed):
                display.changed(followed, followed.snapshot(item.items, now))
            elif isinstance(item, Trouble):
                display.trouble(item.message)
            elif isinstance(item, Recovered):
                display.trouble(None)
            elif isinstance(item, Fatal):
                raise item.error
            display.tick(followed)
    finally:
        watcher.stop()
        display.close(followed)


def _verdict(followed: Followed, *, stop_on_failure: bool) -> int | None:
    if stop_on_failure and followed.first_failure() is not None:
        return EXIT_FAILED
    if followed.all_finished():
        return EXIT_FAILED if followed.first_failure() is not None else EXIT_OK
    return None


def _check_missing(target: Target, followed: Followed, scope: Scope) -> None:
    missing = followed.missing()
    if not missing:
        return
    name = missing[0]
    where = scope.namespace or target.namespace
    others = _namespaces_holding(target, name)
    hint = ""
    if others:
        listed = ", ".join(f'"{ns}"' for ns in others[:3])
        hint = f" (there is one in namespace {listed}: use -n {others[0]})"
    more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
    raise PluginError(f'{RESOURCE} "{name}" not found in namespace "{where}"{more}{hint}')


def _namespaces_holding(target: Target, name: str) -> list[str]:
    """Where else an object of that name is, to help a wrong -n (needs cluster-wide list)."""
    try:
        with target.api_client() as client:
            body = kubernetes.client.CustomObjectsApi(client).list_cluster_custom_object(
                GROUP,
                VERSION,
                PLURAL,
                field_selector=f"metadata.name={name}",
                _request_timeout=min(5.0, target.request_timeout),
            )
    except (ApiException, HTTPError, OSError, PluginError):
        return []
    items: list[dict[str, Any]] = body.get("items") or []  # type: ignore[attr-defined]
    return sorted({str((i.get("metadata") or {}).get("namespace")) for i in items})


def _deadline(timeout: float | None) -> float | None:
    return None if timeout is None else time.monotonic() + timeout


def _timed_out(followed: Followed, timeout: float | None, *, what: str) -> PluginError:
    waiting = [t for t in followed.ordered() if t.outcome is None]
    parts = [
        f"{t.pull.name} ({render.state_word(t)}{' at ' + t.pull.progress if t.pull.progress else ''})"
        for t in waiting[:5]
    ]
    more = f" and {len(waiting) - 5} more" if len(waiting) > 5 else ""
    took = f"{timeout:g}s" if timeout is not None else "the timeout"
    return PluginError(f"timed out after {took} waiting for {', '.join(parts)}{more}; {what}", EXIT_TIMEOUT)


# --- commands -------------------------------------------------------------------------------------


def run_wait(args: argparse.Namespace, target: Target, out: TextIO, err: TextIO) -> int:
    return _wait_for(args.names, args.timeout, args=args, target=target, out=out, err=err)


def _wait_for(
    names: Sequence[str],
    timeout: float | None,
    *,
    args: argparse.Namespace,
    target: Target,
    out: TextIO,
    err: TextIO,
) -> int:
    scope = _name_scope(target.namespace, names)
    followed = Followed(names)
    json_out = args.output == "json"
    display: Display
    if not json_out and render.is_terminal(err):
        display = Live(err, f"waiting in namespace {target.namespace}", with_namespace=False)
    else:
        display = Quiet(err)
    verdict = follow(
        target,
        scope,
        followed,
        display,
        stop_on_failure=True,
        deadline=_deadline(timeout),
    )
    if json_out:
        items = [_document(t) for t in followed.ordered()]
        out.write(json.dumps({"apiVersion": "v1", "kind": "List", "items": items}, indent=2) + "\n")
    else:
        for tracked in followed.ordered():
            if tracked.outcome is not None:
                out.write(render.outcome_line(tracked, with_namespace=False) + "\n")
    out.flush()
    if verdict is None:
        raise _timed_out(followed, timeout, what="the pulls go on")
    return verdict


def _name_scope(namespace: str, names: Sequence[str]) -> Scope:
    # One name: let the server filter; several: watch the namespace and filter here.
    field = f"metadata.name={names[0]}" if len(names) == 1 else None
    return Scope(namespace, field_selector=field)


def run_watch(args: argparse.Namespace, target: Target, out: TextIO, err: TextIO) -> int:
    namespace = None if args.all_namespaces else target.namespace
    field = f"metadata.name={args.names[0]}" if len(args.names) == 1 else None
    scope = Scope(namespace, label_selector=args.selector, field_selector=field)
    followed = Followed(args.names)
    with_ns = namespace is None
    watcher = Watcher(target, scope)
    first = watcher.list_now()
    followed.snapshot(first.items, time.monotonic())
    _check_missing(target, followed, scope)
    if not followed.objects:
        selector = f" matching {args.selector}" if args.selector else ""
        err.write(f"No {PLURAL}{selector} found in {scope.describe()}.\n")
        return EXIT_OK
    display: Display
    if args.output == "json":
        display = JsonLines(out, err)
    elif render.is_terminal(out):
        where = "all namespaces" if with_ns else f"namespace {namespace}"
        display = Live(out, f"blockpulls in {where}", with_namespace=with_ns)
    else:
        display = Plain(out, err, with_namespace=with_ns)
    verdict = follow(
        target,
        scope,
        followed,
        display,
        stop_on_failure=False,
        deadline=_deadline(args.timeout),
        first=first,
    )
    if isinstance(display, Live):
        for tracked in followed.ordered():
            out.write(render.outcome_line(tracked, with_namespace=with_ns) + "\n")
        out.flush()
    if verdict is None:
        raise _timed_out(followed, args.timeout, what="the pulls go on")
    return verdict


_SLUG = re.compile(r"[^a-z0-9-]+")


def generated_prefix(vm: str, disk: str) -> str:
    """`web-1-root-` for a generateName: the VM and the disk's last path part, DNS-1123 safe."""
    last = disk.rstrip("/").rsplit("/", 1)[-1]
    stem = last.rsplit(".", 1)[0] if "." in last.lstrip(".") else last
    slug = _SLUG.sub("-", f"{vm}-{stem}".lower()).strip("-")
    slug = re.sub(r"-{2,}", "-", slug)[:52].strip("-")
    return f"{slug or 'blockpull'}-"


def run_create(args: argparse.Namespace, target: Target, out: TextIO, err: TextIO) -> int:
    spec: dict[str, Any] = {"nodeName": args.node, "vm": args.vm, "disk": args.disk}
    if args.base:
        spec["base"] = args.base
    if args.bandwidth is not None:
        spec["bandwidth"] = int(args.bandwidth) if args.bandwidth.isdigit() else args.bandwidth
    if args.on_error:
        spec["onError"] = args.on_error
    meta = {"name": args.name} if args.name else {"generateName": generated_prefix(args.vm, args.disk)}
    body = {"apiVersion": f"{GROUP}/{VERSION}", "kind": "BlockPull", "metadata": meta, "spec": spec}
    try:
        with target.api_client() as client:
            api = kubernetes.client.CustomObjectsApi(client)
            created: dict[str, Any] = api.create_namespaced_custom_object(  # type: ignore[assignment]
                GROUP, VERSION, target.namespace, PLURAL, body, _request_timeout=target.request_timeout
            )
    except (ApiException, HTTPError, OSError) as exc:
        raise api_error(exc, f'creating a BlockPull in namespace "{target.namespace}"') from None
    name = str(created["metadata"]["name"])
    if args.output == "json" and not args.wait:
        out.write(json.dumps(created, indent=2) + "\n")
        out.flush()
        return EXIT_OK
    if args.output != "json":
        out.write(f"{KIND_PREFIX}/{name} created\n")
        out.flush()
    if not args.wait:
        return EXIT_OK
    try:
        return _wait_for([name], args.timeout, args=args, target=target, out=out, err=err)
    except PluginError as exc:
        if exc.exit_status == EXIT_TIMEOUT:
            exc.message += f" (abort it with: kubectl blockpull abort {name} -n {target.namespace})"
        raise


def run_abort(args: argparse.Namespace, target: Target, out: TextIO, err: TextIO) -> int:
    name = args.name
    scope = _name_scope(target.namespace, [name])
    followed = Followed([name])
    watcher = Watcher(target, scope)
    first = watcher.list_now()
    followed.snapshot(first.items, time.monotonic())
    _check_missing(target, followed, scope)
    key = (target.namespace, name)
    original = followed.objects[key].pull
    uid = original.uid
    _delete_exactly(target, name, uid)
    last = _follow_until_gone(target, scope, followed, key=key, uid=uid, first=first, timeout=args.timeout)
    if last is None:
        pull = followed.objects[key].pull if followed.objects[key].pull.uid == uid else original
        raise _still_deleting(target, name, pull, args.timeout)
    result, message = _abort_story(target, last)
    if args.output == "json":
        doc = {
            "name": name,
            "namespace": target.namespace,
            "uid": uid,
            "phase": last.phase,
            "progress": last.progress,
            "offset": last.offset,
            "length": last.length,
            "result": result,
            "message": message,
        }
        out.write(json.dumps(doc, indent=2) + "\n")
    else:
        out.write(f"{KIND_PREFIX}/{name} {message}\n")
    out.flush()
    if result == "unconfirmed":
        warning(err, f"QEMU did not confirm the cancel of {name}; the job may still exist in QEMU")
    return EXIT_OK


def _delete_exactly(target: Target, name: str, uid: str) -> None:
    """Delete BlockPull `name` if it is still the object `uid`; one already gone is fine."""
    try:
        with target.api_client() as client:
            kubernetes.client.CustomObjectsApi(client).delete_namespaced_custom_object(
                GROUP,
                VERSION,
                target.namespace,
                PLURAL,
                name,
                # Only the object we looked at: never one re-created under the same name meanwhile.
                body=kubernetes.client.V1DeleteOptions(
                    preconditions=kubernetes.client.V1Preconditions(uid=uid)
                ),
                _request_timeout=target.request_timeout,
            )
    except ApiException as exc:
        if exc.status not in (404, 409):  # gone already (409: precondition, another uid now)
            raise api_error(exc, f'deleting {RESOURCE} "{name}"') from None
    except (HTTPError, OSError) as exc:
        raise api_error(exc, f'deleting {RESOURCE} "{name}"') from None


def _still_deleting(target: Target, name: str, pull: Pull, timeout: float) -> PluginError:
    """`abort`'s timeout: the object is still there, most likely held by its agent's finalizer."""
    return PluginError(
        f"timed out after {timeout:g}s: {KIND_PREFIX}/{name} is still being deleted "
        f"({pull.phase or 'no status'}{' at ' + pull.progress if pull.progress else ''}): is the "
        f"blockpull agent of node {pull.node or '?'} running? Without it the finalizer stays; "
        f"to let the object go anyway: kubectl patch bp {name} -n {target.namespace} --type=merge "
        """-p '{"metadata":{"finalizers":null}}'""",
        EXIT_TIMEOUT,
    )


def _follow_until_gone(
    target: Target,
    scope: Scope,
    followed: Followed,
    *,
    key: Key,
    uid: str,
    first: Listed,
    timeout: float,
) -> Pull | None:
    """The object's last state once it is gone, or None after `timeout`."""
    watcher = Watcher(target, scope)
    watcher.start(first.resource_version)
    last = followed.objects[key].pull
    deadline = time.monotonic() + timeout
    try:
        while True:
            tracked = followed.objects.get(key)
            if tracked is not None and tracked.pull.uid == uid:
                last = tracked.pull
            if tracked is None or tracked.gone or tracked.pull.uid != uid:
                return last
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            try:
                item = watcher.items.get(timeout=min(TICK, remaining))
            except queue.Empty:
                continue
            now = time.monotonic()
            if isinstance(item, Changed):
                followed.event(item.kind, item.obj, now)
            elif isinstance(item, Listed):
                followed.snapshot(item.items, now)
            elif isinstance(item, Fatal):
                raise item.error
    finally:
        watcher.stop()


def _abort_story(target: Target, last: Pull) -> tuple[str, str]:
    """(result, the rest of the line) from the last state seen and the agent's Events."""
    where = f" at {last.progress}" if last.progress else ""
    if last.outcome in (Outcome.COMPLETED, Outcome.FAILED):  # finished before the delete
        detail = where if last.outcome is Outcome.COMPLETED else f" ({last.reason})"
        word = "Completed" if last.outcome is Outcome.COMPLETED else "Failed"
        return word.lower(), f"deleted; it had already {word}{detail} (nothing to cancel)"
    if last.phase not in ("Running", "Paused"):
        state = f"{last.phase}: {last.reason}" if last.phase else "no status yet"
        return "not-started", f"deleted before its job started ({state}); nothing ran in QEMU"
    event = _decisive_event(target, last.uid)
    if event is None:
        return (
            "deleted",
            f"deleted while {last.phase}{where} (no Event from the agent says how the cancel went)",
        )
    reason, message = event
    if reason == "Cancelled":
        # An agent that restarted meanwhile cancels by id and knows no percentage: add ours.
        seen = f" (last progress seen: {last.progress})" if last.progress and "%" not in message else ""
        return "cancelled", f"aborted: {message}{seen}"
    if reason in ("Completed", "Failed"):  # it ended before the cancel took effect
        return reason.lower(), f"{reason.lower()} before the cancel took effect: {message}"
    return "unconfirmed", f"deleted, but {reason}: {message}"


def _decisive_event(target: Target, uid: str) -> tuple[str, str] | None:
    """The agent's Event telling how the cancel went (it may trail the deletion a little)."""
    deadline = time.monotonic() + EVENT_GRACE
    while True:
        try:
            with target.api_client() as client:
                events = kubernetes.client.CoreV1Api(client).list_namespaced_event(
                    target.namespace,
                    field_selector=f"involvedObject.uid={uid}",
                    _request_timeout=target.request_timeout,
                )
        except (ApiException, HTTPError, OSError):
            return None  # the story is a bonus: the object is gone, which is what was asked
        found = [(e.reason, e.message or "") for e in events.items if e.reason in _DECISIVE_EVENTS]
        if found:
            return found[-1]
        if time.monotonic() >= deadline:
            return None
        time.sleep(0.2)


# --- entry point ----------------------------------------------------------------------------------

COMMANDS: dict[str, Callable[[argparse.Namespace, Target, TextIO, TextIO], int]] = {
    "create": run_create,
    "wait": run_wait,
    "watch": run_watch,
    "abort": run_abort,
}


def error_line(stream: TextIO, message: str) -> None:
    stream.write(f"{PROG}: error: {' '.join(message.split())}\n")
    stream.flush()


def warning(stream: TextIO, message: str) -> None:
    stream.write(f"{PROG}: warning: {' '.join(message.split())}\n")
    stream.flush()


def _raise_interrupted(signum: int, frame: FrameType | None) -> None:
    raise Interrupted(signum)


def main(argv: Sequence[str] | None = None, out: TextIO | None = None, err: TextIO | None = None) -> int:
    out = out or sys.stdout
    err = err or sys.stderr
    # SIGTERM and SIGHUP unwind like Ctrl-C, so that the terminal is always restored.
    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, _raise_interrupted)
    debug = "--debug" in (argv if argv is not None else sys.argv[1:])
    try:
        args = cli_args.parse(list(argv) if argv is not None else sys.argv[1:])
        target = resolve(
            kubeconfig=args.kubeconfig,
            context=args.context,
            namespace=args.namespace,
            request_timeout=args.request_timeout,
        )
        return COMMANDS[args.command](args, target, out, err)
    except PluginError as exc:
        error_line(err, exc.message)
        return exc.exit_status
    except KeyboardInterrupt:
        err.write("\n")
        return EXIT_SIGNAL_BASE + signal.SIGINT
    except Interrupted as exc:
        return EXIT_SIGNAL_BASE + exc.signum
    except BrokenPipeError:  # `... | head`: the reader went away; say nothing more
        # Python flushes stdout again at exit: point it at /dev/null so that this is silent.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_SIGNAL_BASE + signal.SIGPIPE
    except Exception as exc:
        if debug:
            traceback.print_exc(file=err)
        error_line(err, f"internal error: {type(exc).__name__}: {exc} (a bug; --debug shows where)")
        return EXIT_INTERNAL
