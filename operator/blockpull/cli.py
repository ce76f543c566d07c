"""The `blockpull` command: flatten a running QEMU's disk from a shell, like `virsh blockpull`.

Owns the command line: parsing it (`build_parser`), running each subcommand over one QMP
connection (`run_pull`, `run_wait`, `run_jobs`, `run_abort`, `run_chain`), seeing a job through
with a clean cancel on Ctrl-C, SIGTERM or `--timeout` (`see_through`), and turning every
BlockPull error into one line on stderr and a documented exit status (`exit_status_for`).
What is printed, and how, lives in `blockpull.cli_render`; QMP itself in the engine
(`blockpull.qmp`, `chain`, `stream`), which this module only calls.

Imports are the engine's and the standard library's only; every command needs the engine
(asyncio, qemu.qmp), so importing it lazily would not make a pull faster, only hide its cost
(`benchmarks/bench_cli.py` measures it).

Jobs are started as the agent starts them (`blockpull.pull` holds the sequence both use): an
explicit id, `auto-dismiss: false` so their outcome survives us, and `auto-finalize: false` so
the backing link goes only after the copied data is flushed. `pull` and `wait` conclude the job
they followed (flush, finalize, flush, print, dismiss); a `pull --no-wait` job waits at
`pending`, its chain intact, until `wait` does that. `abort` dismisses the job it cancelled.
`jobs` and `chain` only read, so that listing never steals an outcome from the node agent.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import logging
import os
import signal
import sys
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, NoReturn, TypeAlias

from blockpull import pull as protocol
from blockpull.cli_render import (
    ProgressDisplay,
    Report,
    chain_json,
    chain_table,
    dump_json,
    error_line,
    job_json,
    jobs_table,
    outcome_line,
    progress_display,
    started_line,
    warning_line,
)
from blockpull.driver import (
    ON_ERROR_CHOICES,
    BlockJobDriver,
    Outcome,
    Progress,
    Result,
    StartedJob,
    StreamRequest,
)
from blockpull.errors import (
    BlockPullError,
    Disconnected,
    DiskBusy,
    HypervisorUnavailable,
    InspectionUnsafe,
    InvalidSpec,
    JobFailed,
    JobNotFound,
    PermanentError,
    QMPTimeout,
    TransientError,
    VMExited,
)
from blockpull.qmp import QMPConnection
from blockpull.qmp_driver import QMPDriver
from blockpull.quantity import parse_bandwidth, progress_text

# --- exit statuses --------------------------------------------------------------------------

EXIT_OK = 0
#: The job ended without completing: QEMU reported an error, or someone else cancelled it.
EXIT_JOB_FAILED = 1
#: Bad command line or an invalid value (bandwidth, job id...).
EXIT_USAGE = 2
#: Try again later: no socket, QEMU does not answer, a timeout, the disk is busy.
EXIT_TRANSIENT = 3
#: Retrying cannot help: no such disk, base not in the chain, no such job, QEMU refused.
EXIT_PERMANENT = 4
#: QEMU exited (or was killed) while we followed the job.
EXIT_VM_EXITED = 5
#: A bug in BlockPull (an exception it did not expect); `--debug` shows the traceback.
EXIT_INTERNAL = 70
#: `--timeout` expired and the job was cancelled, as `timeout(1)` exits.
EXIT_TIMEOUT = 124
#: Interrupted by a signal N (and the job cancelled): 128 + N, e.g. 130 for Ctrl-C (SIGINT).
EXIT_SIGNAL_BASE = 128

#: How often a followed job is re-read for progress. Completion comes from QEMU's events at
#: once; this only paces the display (and costs well under 1% of a core).
POLL_INTERVAL = 0.5
#: Signals that make `pull` and `wait` cancel the job they follow before exiting.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)

EPILOG = f"""\
Jobs are started with an explicit id, auto-dismiss and auto-finalize off, so a job's outcome
survives the command that started it and the disk loses nothing if QEMU dies before the
outcome is collected: `pull --no-wait` prints the id; the job copies, then waits at `pending`
(copy done, backing chain unchanged); `wait` (from any later process) flushes the disk, lets
QEMU change the chain, flushes again, reports the outcome and dismisses the job. `jobs` lists
running, pending and concluded jobs. `jobs` and `chain` never change anything.

Progress goes to stderr: a bar redrawn in place on a terminal, otherwise one line per change
(at most one a second). Results go to stdout; with --output json stdout holds exactly one JSON
document, on failure too ({{"error": {{"reason", "message", "exit_status"}}}}), except for
command-line usage errors, which are reported on stderr only.

libvirt domains: with `--connect URI` (e.g. qemu:///system) SOCKET is a libvirt domain name and
every command goes through libvirt's own block-job API (`virsh blockpull`'s), never a QMP
command behind libvirt's back; DISK is the disk's target (vda) or its active image's path, a
base an absolute path or libvirt's index form (vda[2]); job ids are DOMAIN/TARGET. libvirt has
no pause and reports no error text for a failed job (see libvirtd's log).

exit status:
  {EXIT_OK}    success (pull/wait: the job completed; abort: the job is gone)
  {EXIT_JOB_FAILED}    the job failed (QEMU's error text is printed) or was cancelled by someone else
  {EXIT_USAGE}    bad command line or invalid value (bandwidth, job id)
  {EXIT_TRANSIENT}    try again later: no QMP socket, QEMU not answering (or another client holds a
       single-client -qmp monitor), a command timed out, the disk is busy with another job
  {EXIT_PERMANENT}    will not work as asked: unknown disk, base not in the chain, unknown job,
       QEMU refused the command
  {EXIT_VM_EXITED}    QEMU exited during the pull (the disk keeps its backing chain)
  {EXIT_INTERNAL}   internal error (a bug; --debug shows the traceback)
  {EXIT_TIMEOUT}  --timeout expired: the job was cancelled (the disk keeps its chain)
  128+N  signal N (130 Ctrl-C, 143 SIGTERM, 129 SIGHUP): the job was cancelled
If a cancel loses the race against completion, the pull completed and the status is 0.
"""


# --- parsing --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Settings:
    """Options every subcommand takes (before or after the subcommand's name)."""

    connect_timeout: float = 5.0
    command_timeout: float = 10.0
    output: str = "text"
    debug: bool = False
    #: `--connect URI`: the VM is a libvirt domain (SOCKET names the domain), reached through
    #: libvirt's block-job API at this URI instead of a QMP socket.
    connect: str | None = None

    @property
    def json(self) -> bool:
        return self.output == "json"


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, got {text!r}")
    return value


def _bandwidth(text: str) -> int:
    try:
        return parse_bandwidth(text)
    except InvalidSpec as exc:
        raise argparse.ArgumentTypeError(exc.message) from None


def _global_options(parser: argparse.ArgumentParser, *, top: bool) -> None:
    # On the top-level parser the defaults are real; on subparsers they are SUPPRESSed, so that
    # `blockpull --output json jobs S` and `blockpull jobs S --output json` both work and a
    # subparser never overwrites what was given before the subcommand.
    def default(value: Any) -> Any:
        return value if top else argparse.SUPPRESS

    defaults = Settings()
    group = parser.add_argument_group("connection and output")
    group.add_argument(
        "--connect-timeout",
        type=_seconds,
        metavar="SECONDS",
        default=default(defaults.connect_timeout),
        help="give up when QEMU does not greet within this time (default: 5)",
    )
    group.add_argument(
        "--command-timeout",
        type=_seconds,
        metavar="SECONDS",
        default=default(defaults.command_timeout),
        help="give up when QEMU does not answer a command within this time (default: 10)",
    )
    group.add_argument(
        "--connect",
        "-c",
        metavar="URI",
        default=default(None),
        help="the VM is a libvirt domain: SOCKET is then the DOMAIN name, reached through "
        "libvirt's block-job API at URI (e.g. qemu:///system), like `virsh -c URI`",
    )
    group.add_argument(
        "--output",
        "-o",
        choices=("text", "json"),
        default=default(defaults.output),
        help="text for people, json for scripts (one document on stdout)",
    )
    group.add_argument(
        "--debug",
        action="store_true",
        default=default(False),
        help="log QMP traffic to stderr and show tracebacks",
    )


#: What `add_subparsers` returns (argparse's type for it is private).
_Commands: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="blockpull",
        description="Flatten a running QEMU's disk (QMP block-stream), like `virsh blockpull "
        "--wait --verbose`, and manage its block jobs. SOCKET is a QMP monitor's unix socket.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _global_options(parser, top=True)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    # In the order `--help` lists them.
    for add in (_add_pull, _add_wait, _add_jobs, _add_abort, _add_chain):
        add(commands)
    return parser


def _command(commands: _Commands, name: str, help_text: str, description: str) -> argparse.ArgumentParser:
    """A subcommand with what every one takes: SOCKET and the connection and output options."""
    sub = commands.add_parser(
        name,
        help=help_text,
        description=description,
        epilog="exit status: see `blockpull --help`",
    )
    sub.add_argument("socket", metavar="SOCKET", help="the QMP monitor's unix socket")
    _global_options(sub, top=False)
    return sub


def _add_pull(commands: _Commands) -> None:
    pull = _command(
        commands,
        "pull",
        "copy the data of a disk's backing images into it",
        "Start a block-stream job into DISK and, unless --no-wait, follow it to its end with a "
        "progress display. Ctrl-C, SIGTERM or --timeout cancel the job cleanly: QEMU keeps "
        "the backing chain intact with the data copied so far. The job is dismissed once "
        "its outcome is printed.",
    )
    _pull_options(pull)


def _add_wait(commands: _Commands) -> None:
    wait = _command(
        commands,
        "wait",
        "re-attach to a job, follow it to its end, report and dismiss it",
        "Follow block job JOB (e.g. started with `pull --no-wait`) from this process until it "
        "ends, print its outcome and dismiss it. A job that already ended is reported with its "
        "true outcome at once. Ctrl-C, SIGTERM or --timeout cancel the job, as with pull.",
    )
    wait.add_argument("job", metavar="JOB", help="the job id")
    _follow_options(wait)


def _add_jobs(commands: _Commands) -> None:
    _command(
        commands,
        "jobs",
        "list block jobs (running and concluded)",
        "List QEMU's jobs: id, type, status, outcome of a concluded job, progress, offset/len, "
        "speed limit, paused, I/O status and error. Changes nothing.",
    )


def _add_abort(commands: _Commands) -> None:
    abort = _command(
        commands,
        "abort",
        "cancel a block job, wait for QEMU to confirm, report and dismiss it",
        "Cancel block job JOB (running or paused), wait for QEMU to confirm (at most "
        "--command-timeout seconds), print whether it was cancelled or completed first, and "
        "dismiss it. A job that already ended is reported and dismissed.",
    )
    abort.add_argument("job", metavar="JOB", help="the job id")


def _add_chain(commands: _Commands) -> None:
    chain = _command(
        commands,
        "chain",
        "print a disk's backing chain, active image first",
        "Print DISK's backing chain: node name, format, virtual size, file and the backing "
        "name recorded in each image's header, active image first. Changes nothing.",
    )
    chain.add_argument("disk", metavar="DISK", help="node-name, drive id, device id or image path")


def _pull_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "disk",
        metavar="DISK",
        help="node-name, drive id, guest device id, or the active image's absolute path",
    )
    parser.add_argument(
        "--base",
        metavar="BASE",
        help="keep this backing image (path or node-name) and everything below it; "
        "a relative backing name stays relative (default: pull everything)",
    )
    parser.add_argument(
        "--bandwidth",
        type=_bandwidth,
        default=0,
        metavar="BYTES_PER_S",
        help="limit, in bytes/s or a quantity like 100Mi or 1.5G (default: 0 = unlimited)",
    )
    parser.add_argument(
        "--on-error",
        choices=ON_ERROR_CHOICES,
        default="report",
        help="what QEMU does on an I/O error (default: report)",
    )
    parser.add_argument("--job-id", metavar="ID", help="QEMU job id (default: blockpull-<8 hex digits>)")
    _follow_options(parser)
    parser.add_argument(
        "--no-wait",
        action="store_true",
        help="print the job id and exit at once; the job waits, chain intact, once its copy is "
        "done until `blockpull wait` finalizes, reports and dismisses it",
    )


def _follow_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--timeout",
        type=_seconds,
        metavar="SECONDS",
        help="cancel the job when it has not ended after this many seconds (exit 124)",
    )
    parser.add_argument("--quiet", "-q", action="store_true", help="no progress display, only the result")


def settings_from(args: argparse.Namespace) -> Settings:
    return Settings(
        connect_timeout=float(args.connect_timeout),
        command_timeout=float(args.command_timeout),
        output=str(args.output),
        debug=bool(args.debug),
        connect=args.connect,
    )


# --- entry point ----------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    """Console-script entry: parse, run one command, map its errors to an exit status.

    Called without `argv` (as the `blockpull` program, reading `sys.argv`), it ends the
    process itself once everything is printed and flushed (see `_exit_now`). Called with an
    `argv` (tests, other Python code), it returns the exit status.
    """
    as_program = argv is None
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "pull" and args.no_wait and args.timeout is not None:
        parser.error("--timeout needs a command that waits: drop --no-wait, or use `blockpull wait`")
    settings = settings_from(args)
    _configure_logging(settings.debug)
    status = _run(args, settings)
    if as_program and not settings.debug:
        _exit_now(status)
    return status


def _run(args: argparse.Namespace, settings: Settings) -> int:
    try:
        return asyncio.run(_dispatch(args, settings))
    except BlockPullError as exc:
        return _fail(settings, exc)
    except KeyboardInterrupt:
        # Ctrl-C before a job existed (while connecting, or reading the chain): nothing to cancel.
        sys.stderr.write("blockpull: interrupted\n")
        return EXIT_SIGNAL_BASE + signal.SIGINT
    except BrokenPipeError:
        # `blockpull jobs S | head -1`: the reader left; nothing to report to anyone.
        _silence_stdout()
        return EXIT_OK
    except Exception as exc:
        if settings.debug:
            raise
        error_line(sys.stderr, f"internal error: {exc!r} (run with --debug for a traceback)")
        return EXIT_INTERNAL


def _exit_now(status: int) -> NoReturn:
    """Flush what we printed and leave without the interpreter's teardown.

    By now the job is reported and dismissed and the QMP connection closed; tearing down the
    interpreter (asyncio, qemu.qmp and friends) would only add 10-20 ms to every command,
    which `benchmarks/bench_cli.py` counts as time the tool adds to a pull.
    """
    for stream_ in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):
            stream_.flush()
    os._exit(status)


def _where(settings: Settings, socket: str) -> str:
    """How a command line names the VM: its socket, or `--connect URI DOMAIN`."""
    return f"--connect {settings.connect} {socket}" if settings.connect else socket


def _vm_arg(settings: Settings, driver: BlockJobDriver) -> str:
    if isinstance(driver, QMPDriver):
        return driver.conn.socket_path
    return _where(settings, str(getattr(driver, "domain", "DOMAIN")))


async def _dispatch(args: argparse.Namespace, settings: Settings) -> int:
    command = str(args.command)
    socket = str(args.socket)
    if command == "pull":
        return await run_pull(
            settings,
            socket,
            disk=str(args.disk),
            base=args.base,
            bandwidth=int(args.bandwidth),
            on_error=str(args.on_error),
            job_id=args.job_id or f"blockpull-{os.urandom(4).hex()}",
            timeout=args.timeout,
            quiet=bool(args.quiet),
            no_wait=bool(args.no_wait),
        )
    if command == "wait":
        return await run_wait(settings, socket, str(args.job), timeout=args.timeout, quiet=bool(args.quiet))
    if command == "jobs":
        return await run_jobs(settings, socket)
    if command == "abort":
        return await run_abort(settings, socket, str(args.job))
    if command == "chain":
        return await run_chain(settings, socket, str(args.disk))
    raise AssertionError(f"unknown command {command!r}")


def exit_status_for(exc: BlockPullError) -> int:
    """The documented exit status of an error (see the `--help` epilog)."""
    if isinstance(exc, InvalidSpec):
        return EXIT_USAGE
    if isinstance(exc, VMExited):
        return EXIT_VM_EXITED
    if isinstance(exc, JobFailed):
        return EXIT_JOB_FAILED
    if isinstance(exc, TransientError):
        return EXIT_TRANSIENT
    if isinstance(exc, PermanentError):
        return EXIT_PERMANENT
    return EXIT_PERMANENT


def _fail(settings: Settings, exc: BlockPullError) -> int:
    status = exit_status_for(exc)
    if settings.json:
        document = {"error": {"reason": exc.reason, "message": exc.message, "exit_status": status}}
        dump_json(sys.stdout, document)
    error_line(sys.stderr, exc.message)
    return status


def _configure_logging(debug: bool) -> None:
    if debug:
        logging.basicConfig(level=logging.DEBUG, format="%(asctime)s %(name)s: %(message)s")
    else:
        # qemu.qmp warns about late replies to commands we stopped waiting for; those are
        # expected after a cancel and must not leak onto the user's terminal. Our own errors
        # are reported once, as one line, by `main`.
        logging.getLogger().addHandler(logging.NullHandler())


def _silence_stdout() -> None:
    # Python flushes stdout at exit and would complain again about the closed pipe.
    with contextlib.suppress(OSError, ValueError):
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


# --- seeing a job through ---------------------------------------------------------------------


class StopSignals:
    """SIGINT, SIGTERM and SIGHUP while we follow a job: ask for a clean cancel, not a traceback.

    Installed just before a job is started (a signal during the start only sets the flag; the
    job is cancelled as soon as it exists), removed when the command ends. A second signal
    while waiting for QEMU to confirm the cancel stops waiting.
    """

    def __init__(self) -> None:
        self._event = asyncio.Event()
        self.first: signal.Signals | None = None

    async def __aenter__(self) -> StopSignals:
        loop = asyncio.get_running_loop()
        for sig in STOP_SIGNALS:
            loop.add_signal_handler(sig, self._received, sig)
        return self

    async def __aexit__(self, *exc: object) -> None:
        loop = asyncio.get_running_loop()
        for sig in STOP_SIGNALS:
            loop.remove_signal_handler(sig)

    def _received(self, sig: signal.Signals) -> None:
        if self.first is None:
            self.first = sig
        self._event.set()

    @property
    def requested(self) -> bool:
        return self.first is not None

    def rearm(self) -> None:
        """Forget signals seen so far, to notice the next one."""
        self._event.clear()

    async def wait(self) -> None:
        await self._event.wait()


@dataclass(frozen=True)
class Followed:
    """How following a job ended: the job once it had ended (None if a cancel went unconfirmed)."""

    job: Progress | None
    #: `timeout` or a signal's name when we asked QEMU to cancel the job.
    stopped_by: str | None


async def see_through(
    driver: BlockJobDriver,
    job_id: str,
    display: ProgressDisplay,
    *,
    deadline: float | None,
    stops: StopSignals,
    confirm_timeout: float,
) -> Followed:
    """Follow a job until it has ended; on a stop signal or the deadline, cancel it cleanly.

    A cancel waits at most `confirm_timeout` for QEMU to confirm. Nothing is finalized or
    dismissed here (`blockpull.pull.conclude` does that). Raises `VMExited` when QEMU goes away.
    """
    loop = asyncio.get_running_loop()
    last_seen: Progress | None = None

    def on_progress(job: Progress) -> None:
        nonlocal last_seen
        last_seen = job
        display.update(job)

    try:
        if not stops.requested:
            timeout = None if deadline is None else max(0.0, deadline - loop.time())
            ended = await _first_of(_follow_through_outages(driver, job_id, on_progress), stops, timeout)
            if ended is not None:
                return Followed(ended, None)
        stopped_by = stops.first.name if stops.first is not None else "timeout"
        display.finish()
        sys.stderr.write(f"blockpull: {stopped_by}: cancelling job {job_id}...\n")
        stops.rearm()
        cancelled = await _first_of(
            protocol.cancel_and_confirm(driver, job_id, timeout=confirm_timeout, poll_interval=POLL_INTERVAL),
            stops,
            None,
        )
        return Followed(cancelled, stopped_by)
    except Disconnected as exc:
        where = f" at {progress_text(last_seen.offset, last_seen.length)}" if last_seen is not None else ""
        raise VMExited(
            f"QEMU exited during the pull (job {job_id}{where}); the disk keeps its backing chain "
            "and loses nothing: the chain changes only after the copied data is flushed"
        ) from exc


async def _follow_through_outages(
    driver: BlockJobDriver, job_id: str, on_progress: Callable[[Progress], None]
) -> Progress:
    """`blockpull.pull.follow`, riding out a hypervisor that is away for a while: a libvirtd
    restarted mid-job leaves QEMU and the job running, and the driver's connection re-opens by
    itself. Said once on stderr; a stop signal or `--timeout` still ends the wait."""
    backoff = 0.5
    said = False
    while True:
        try:
            return await protocol.follow(driver, job_id, on_progress=on_progress, poll_interval=POLL_INTERVAL)
        except HypervisorUnavailable as exc:
            if not said:
                sys.stderr.write(f"blockpull: {exc.message}; the job goes on, waiting for it\n")
                said = True
        await asyncio.sleep(backoff)
        backoff = min(backoff * 2, 5.0)


async def _first_of(
    waiting: Coroutine[Any, Any, Progress | None],
    stops: StopSignals,
    timeout: float | None,
) -> Progress | None:
    """The result, or None when a stop signal or the timeout came first (the wait is dropped)."""
    waiter: asyncio.Task[Progress | None] = asyncio.ensure_future(waiting)
    stopper = asyncio.ensure_future(stops.wait())
    try:
        await asyncio.wait({waiter, stopper}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopper.cancel()
        if not waiter.done():
            waiter.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await waiter
    return waiter.result() if not waiter.cancelled() else None


def outcome_status(report: Report) -> int:
    """The documented exit status of a job's outcome (see the `--help` epilog)."""
    result = report.outcome.result
    if result is Result.COMPLETED:
        return EXIT_OK
    if result is Result.CANCELLED:
        return _stop_status(report.stopped_by) if report.stopped_by else EXIT_JOB_FAILED
    return EXIT_JOB_FAILED


def _stop_status(stopped_by: str) -> int:
    if stopped_by == "timeout":
        return EXIT_TIMEOUT
    if stopped_by == "abort":
        return EXIT_OK
    return EXIT_SIGNAL_BASE + signal.Signals[stopped_by].value


def _emit(settings: Settings, report: Report) -> int:
    """Print the outcome (stdout; stderr too when it is a failure) and return the exit status."""
    status = outcome_status(report)
    if settings.json:
        document = report.as_json()
        document["exit_status"] = status
        dump_json(sys.stdout, document)
    if status == EXIT_OK:
        if not settings.json:
            sys.stdout.write(outcome_line(report) + "\n")
            sys.stdout.flush()
    else:
        error_line(sys.stderr, outcome_line(report))
    return status


def _unconfirmed(job_id: str, socket: str, stopped_by: str, timeout: float) -> int:
    error_line(
        sys.stderr,
        f"{stopped_by}: asked QEMU to cancel job {job_id} but saw no confirmation (waited at "
        f"most {timeout:g}s); it may still be running: `blockpull jobs {socket}` shows it",
    )
    return _stop_status(stopped_by)


@contextlib.contextmanager
def _explained_inspection(disk: str, socket: str) -> Iterator[None]:
    """Say what `InspectionUnsafe` means for someone at a shell (the agent retries by itself)."""
    try:
        yield
    except InspectionUnsafe as exc:
        raise InspectionUnsafe(
            f"cannot read the backing chain of disk {disk!r} while a block job runs on this VM "
            "(QEMU 7.2 can crash when asked to list its block nodes then); try again once no "
            f"job is running (`blockpull jobs {socket}`)"
        ) from exc


@contextlib.asynccontextmanager
async def _driver(settings: Settings, socket: str) -> AsyncIterator[BlockJobDriver]:
    if settings.connect:
        # libvirt's own block-job API for a libvirt domain (never QMP behind libvirt's back).
        from blockpull.libvirt.connection import LibvirtConnection  # noqa: PLC0415
        from blockpull.libvirt.driver import LibvirtDriver  # noqa: PLC0415

        lv = LibvirtConnection(settings.connect, call_timeout=settings.command_timeout)
        await lv.open()
        try:
            yield LibvirtDriver(lv, socket)
        finally:
            await lv.close()
        return
    conn = await QMPConnection.open(
        socket,
        connect_timeout=settings.connect_timeout,
        command_timeout=settings.command_timeout,
        client_name="blockpull-cli",
    )
    try:
        yield QMPDriver(conn)
    finally:
        await conn.close()


def _display(label: str, quiet: bool) -> ProgressDisplay:
    return progress_display(sys.stderr, label, quiet=quiet)


async def _start(driver: BlockJobDriver, request: StreamRequest, socket: str) -> StartedJob:
    try:
        with _explained_inspection(request.disk, socket):
            return await driver.start(request)
    except DiskBusy as exc:
        try:
            jobs = await driver.blocking_jobs(request.disk)
        except BlockPullError:
            raise exc from None
        if not jobs:
            raise
        raise DiskBusy(protocol.busy_message(request.disk, jobs, driver.collect_command)) from exc


async def _conclude_and_report(
    settings: Settings, driver: BlockJobDriver, ended: Progress, device: str | None, report: Report
) -> int:
    """Finish an ended job durably, print its outcome, then dismiss it (blockpull.pull)."""
    printed: list[int] = []

    async def record(outcome: Outcome) -> None:
        final = dataclasses.replace(
            report,
            outcome=outcome,
            released_images=report.released_images if outcome.ok else (),
        )
        printed.append(_emit(settings, final))

    try:
        await protocol.conclude(driver, ended.job_id, device, record=record)
    except BlockPullError as exc:
        if not printed:
            raise
        warning_line(
            sys.stderr,
            f"could not dismiss job {ended.job_id}: {exc.message}; "
            f"`blockpull wait {_vm_arg(settings, driver)} {ended.job_id}` reports and dismisses it",
        )
    return printed[0]


# --- the commands -----------------------------------------------------------------------------


async def run_pull(
    settings: Settings,
    socket: str,
    *,
    disk: str,
    base: str | None,
    bandwidth: int,
    on_error: str,
    job_id: str,
    timeout: float | None,
    quiet: bool,
    no_wait: bool,
) -> int:
    """`blockpull pull`: start a stream and, unless `no_wait`, see it through durably."""
    request = StreamRequest(
        disk=disk, job_id=job_id, base=base, bandwidth=bandwidth, on_error=on_error
    )  # InvalidSpec before anything is sent to QEMU
    loop = asyncio.get_running_loop()
    async with _driver(settings, socket) as driver, StopSignals() as stops:
        started_at = loop.time()
        started = await _start(driver, request, socket)
        if no_wait and not stops.requested:
            _print_started(settings, started, disk=disk, base=base, socket=_where(settings, socket))
            return EXIT_OK
        if not quiet:
            sys.stderr.write(f"blockpull: {started_line(job_id, started.device, started.base_node)}\n")
        display = _display(job_id, quiet)
        deadline = None if timeout is None else started_at + timeout
        try:
            followed = await see_through(
                driver,
                job_id,
                display,
                deadline=deadline,
                stops=stops,
                confirm_timeout=settings.command_timeout,
            )
        except JobNotFound:
            display.finish()
            return await _report_vanished(settings, driver, job_id, disk, base)
        if followed.job is None:
            display.finish()
            assert followed.stopped_by is not None
            return _unconfirmed(
                job_id, _where(settings, socket), followed.stopped_by, settings.command_timeout
            )
        display.finish(_pending_outcome(followed.job))
        report = Report(
            outcome=_pending_outcome(followed.job),
            elapsed=loop.time() - started_at,
            disk=disk,
            device=started.device,
            base=base,
            base_node=started.base_node,
            released_images=started.released_images,
            stopped_by=followed.stopped_by,
        )
        return await _conclude_and_report(settings, driver, followed.job, started.device, report)


def _print_started(
    settings: Settings, started: StartedJob, *, disk: str, base: str | None, socket: str
) -> None:
    """`pull --no-wait`: the job id (text), or what was started and how to collect it (JSON)."""
    if not settings.json:
        sys.stdout.write(started.job_id + "\n")
        return
    dump_json(
        sys.stdout,
        {
            "job_id": started.job_id,
            "status": "started",
            "disk": disk,
            "device": started.device,
            "base": base,
            "base_node": started.base_node,
            "will_release_images": list(started.released_images),
            "collect_with": f"blockpull wait {socket} {started.job_id}",
        },
    )


def _pending_outcome(job: Progress) -> Outcome:
    """A job held at `pending` has copied everything: what its outcome will be once finalized."""
    return protocol.outcome_of(job) or Outcome(job.job_id, Result.COMPLETED, job.offset, job.length)


async def _report_vanished(
    settings: Settings, driver: BlockJobDriver, job_id: str, disk: str, base: str | None
) -> int:
    """Our job disappeared (another client dismissed it): decide from the chain what it did."""
    if not await driver.pulled(disk, base):
        raise JobNotFound(
            f"job {job_id} disappeared (dismissed by another QMP client?) and disk {disk!r} "
            "still needs its backing images: the pull did not complete"
        )
    return _emit(settings, Report(outcome=Outcome(job_id, Result.COMPLETED, 0, 0), disk=disk, base=base))


async def run_wait(
    settings: Settings, socket: str, job_id: str, *, timeout: float | None, quiet: bool
) -> int:
    """`blockpull wait`: re-attach to a job by id, see it through durably, report, dismiss."""
    loop = asyncio.get_running_loop()
    async with _driver(settings, socket) as driver, StopSignals() as stops:
        attached_at = loop.time()
        job = await driver.find_job(job_id)
        if job is None:
            raise JobNotFound(f"QEMU has no block job {job_id!r}")
        if job.job_type not in ("stream", ""):
            raise InvalidSpec(
                f"job {job_id} is a {job.job_type} job; `blockpull wait` follows stream jobs "
                "(`blockpull abort` cancels any job)"
            )
        display = _display(job_id, quiet)
        deadline = None if timeout is None else attached_at + timeout
        followed = await see_through(
            driver, job_id, display, deadline=deadline, stops=stops, confirm_timeout=settings.command_timeout
        )
        if followed.job is None:
            display.finish()
            assert followed.stopped_by is not None
            return _unconfirmed(
                job_id, _where(settings, socket), followed.stopped_by, settings.command_timeout
            )
        display.finish(_pending_outcome(followed.job))
        report = Report(
            outcome=_pending_outcome(followed.job),
            elapsed=None if job.ended else loop.time() - attached_at,
            stopped_by=followed.stopped_by,
            already_concluded=job.ended,
        )
        return await _conclude_and_report(settings, driver, followed.job, None, report)


async def run_abort(settings: Settings, socket: str, job_id: str) -> int:
    """`blockpull abort`: cancel, wait (bounded) for QEMU's word, report, dismiss."""
    async with _driver(settings, socket) as driver:
        job = await driver.find_job(job_id)
        if job is None:
            raise JobNotFound(f"QEMU has no block job {job_id!r}")
        ended = (
            job
            if job.concluded
            else await protocol.cancel_and_confirm(
                driver, job_id, timeout=settings.command_timeout, poll_interval=POLL_INTERVAL
            )
        )
        if ended is None:
            raise QMPTimeout(
                f"asked QEMU to cancel job {job_id} but it did not confirm within "
                f"{settings.command_timeout:g}s; it may still be running"
            )
        report = Report(
            outcome=_pending_outcome(ended),
            stopped_by=None if job.concluded else "abort",
            already_concluded=job.concluded,
        )
        return await _conclude_and_report(settings, driver, ended, None, report)


async def run_jobs(settings: Settings, socket: str) -> int:
    """`blockpull jobs`: list every job QEMU has, concluded ones with their outcome."""
    async with _driver(settings, socket) as driver:
        jobs = await driver.list_jobs()
    if settings.json:
        dump_json(sys.stdout, {"jobs": [job_json(job) for job in jobs]})
    else:
        sys.stdout.write(jobs_table(jobs, socket) + "\n")
    return EXIT_OK


async def run_chain(settings: Settings, socket: str, disk: str) -> int:
    """`blockpull chain`: the disk's backing chain as QEMU has it open, active image first."""
    async with _driver(settings, socket) as driver:
        with _explained_inspection(disk, socket):
            chain = await driver.chain(disk)
    if settings.json:
        dump_json(sys.stdout, chain_json(disk, chain))
    else:
        sys.stdout.write(chain_table(chain) + "\n")
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
