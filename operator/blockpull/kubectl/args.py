"""The command line of `kubectl blockpull`: kubectl's connection flags, the four subcommands.

Owns parsing only. kubectl runs a plugin with every argument after the plugin's name and does
not accept flags before it (`kubectl --context x blockpull` is refused by kubectl itself), so
the plugin takes kubectl's flags (`--kubeconfig`, `--context`, `-n`, `-A`, `-o`,
`--request-timeout`) itself, before or after the subcommand's name.
"""

from __future__ import annotations

import argparse
import re
from typing import Any, NoReturn, TypeAlias

from blockpull.errors import InvalidSpec
from blockpull.kubectl.config import PluginError
from blockpull.quantity import parse_bandwidth

#: Bound on each API request, and the longest a watch may stay silent before it is resumed.
DEFAULT_REQUEST_TIMEOUT = 30.0
#: As krew asks of plugins: help and usage name the command as it is typed, through kubectl.
PROG = "kubectl blockpull"
DEFAULT_ABORT_TIMEOUT = 120.0
_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h)")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}

EPILOG = """\
Connection flags work as in kubectl: --kubeconfig, else $KUBECONFIG (a ':'-separated list),
else ~/.kube/config, else the in-cluster service account; --context picks a context;
-n/--namespace defaults to the context's namespace. Put them after `blockpull` (kubectl
refuses flags before a plugin's name).

DURATION is a number of seconds or a kubectl duration such as 30s, 5m, 1h30m.

exit status:
  0    success: every pull Completed (create without --wait: created; abort: the object is gone)
  1    a pull Failed (or was deleted before it had an outcome); its reason and message are printed
  2    bad command line or input: unknown object, no kubeconfig, unknown context, invalid value
  3    the cluster could not be asked: API server unreachable, access refused, CRD not installed
  124  --timeout expired first (nothing is cancelled: the pulls go on)
  130  interrupted by Ctrl-C (143 SIGTERM); the pulls go on
  70   a bug in the plugin (--debug shows the traceback)
"""


def duration(text: str) -> float:
    """Seconds from `90`, `2.5`, `30s`, `5m`, `1h30m`, `500ms`; `0` is allowed (check once)."""
    value = text.strip()
    try:
        seconds = float(value)
    except ValueError:
        parts = _DURATION_PART.findall(value)
        if not parts or "".join(n + u for n, u in parts) != value:
            raise argparse.ArgumentTypeError(
                f"invalid duration {text!r}: use seconds (90) or a duration like 30s, 5m, 1h30m"
            ) from None
        seconds = sum(float(number) * _UNITS[unit] for number, unit in parts)
    if not 0 <= seconds < float("inf"):  # also refuses NaN
        raise argparse.ArgumentTypeError(f"invalid duration {text!r}: must be 0 or more")
    return seconds


def _positive_duration(text: str) -> float:
    seconds = duration(text)
    if seconds <= 0:
        raise argparse.ArgumentTypeError(f"invalid duration {text!r}: must be more than 0")
    return seconds


def bandwidth(text: str) -> str:
    """The value as typed (the API takes quantities), after checking it the way the agent will."""
    try:
        parse_bandwidth(int(text) if text.isdigit() else text)
    except InvalidSpec as exc:
        raise argparse.ArgumentTypeError(exc.message) from None
    return text


class _Parser(argparse.ArgumentParser):
    """Usage errors as the plugin's one error line (no usage dump; --help has it)."""

    def error(self, message: str) -> NoReturn:
        command = self.prog.removeprefix(PROG).strip()
        where = f"{command}: " if command else ""
        raise PluginError(
            f"{where}{message} (see: kubectl blockpull {command + ' ' if command else ''}--help)"
        )


def _global_options(parser: argparse.ArgumentParser, *, top: bool) -> None:
    # Real defaults on the top-level parser only; SUPPRESS on subparsers, so that a flag given
    # before the subcommand is not overwritten by the subparser's default.
    def default(value: Any) -> Any:
        return value if top else argparse.SUPPRESS

    group = parser.add_argument_group("kubectl flags")
    group.add_argument("--kubeconfig", metavar="PATH", default=default(None), help="kubeconfig file to use")
    group.add_argument("--context", metavar="NAME", default=default(None), help="kubeconfig context to use")
    group.add_argument(
        "-n", "--namespace", metavar="NS", default=default(None), help="namespace (default: the context's)"
    )
    group.add_argument(
        "-A",
        "--all-namespaces",
        action="store_true",
        default=default(False),
        help="watch: objects of every namespace",
    )
    group.add_argument(
        "-o",
        "--output",
        choices=("json",),
        default=default(None),
        help="json for scripts (watch: one object per line per change)",
    )
    group.add_argument(
        "--request-timeout",
        type=_positive_duration,
        metavar="DURATION",
        default=default(DEFAULT_REQUEST_TIMEOUT),
        help="bound on each API request; a watch silent this long is resumed (default: 30s)",
    )
    group.add_argument("--debug", action="store_true", default=default(False), help="show tracebacks")


#: What `add_subparsers` returns (argparse's type for it is private).
_Commands: TypeAlias = "argparse._SubParsersAction[_Parser]"


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog=PROG,
        description="Create, follow, wait for and abort BlockPulls (blockpull.dev/v1alpha1): "
        "flatten running VMs' disks.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _global_options(parser, top=True)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)
    # In the order `--help` lists them. Each takes kubectl's flags after its name too.
    for add in (_add_create, _add_wait, _add_watch, _add_abort):
        _global_options(add(commands), top=False)
    return parser


def _add_create(commands: _Commands) -> argparse.ArgumentParser:
    create = commands.add_parser(
        "create",
        help="create a BlockPull (and with --wait, follow it to its outcome)",
        description="Create a BlockPull for disk DISK of VM VM (in the namespace) on node NODE.",
    )
    create.add_argument("vm", metavar="VM", help="the VM, in the namespace")
    create.add_argument("disk", metavar="DISK", help="node-name, drive id, device id or active image path")
    create.add_argument("--node", required=True, metavar="NODE", help="spec.nodeName: where the VM runs")
    create.add_argument("--base", metavar="BASE", help="keep this backing image (path or node-name)")
    create.add_argument("--bandwidth", type=bandwidth, metavar="Q", help="bytes/s or a quantity: 200Mi")
    create.add_argument(
        "--on-error", choices=("report", "stop", "enospc", "ignore"), help="QEMU's on-error (default report)"
    )
    create.add_argument("--name", metavar="NAME", help="object name (default: generated from VM and DISK)")
    create.add_argument("--wait", action="store_true", help="follow it like `wait` until its outcome")
    create.add_argument("--timeout", type=duration, metavar="DURATION", help="with --wait: give up after")
    return create


def _add_wait(commands: _Commands) -> argparse.ArgumentParser:
    wait = commands.add_parser(
        "wait",
        help="wait until the named BlockPulls have an outcome (1 as soon as one failed)",
        description="Return when every named BlockPull has an outcome: 0 if all Completed, 1 as "
        "soon as one Failed (with its reason and message), 124 when --timeout expires first.",
    )
    wait.add_argument("names", nargs="+", metavar="NAME")
    wait.add_argument("--timeout", type=duration, metavar="DURATION", help="default: no limit; 0: check once")
    return wait


def _add_watch(commands: _Commands) -> argparse.ArgumentParser:
    watch = commands.add_parser(
        "watch",
        help="live view of BlockPulls until all have an outcome",
        description="Show the BlockPulls (the named ones, or all selected) with a progress bar "
        "each on a terminal, one line per change otherwise; return when all shown have an "
        "outcome: 0 if all Completed, 1 if any Failed.",
    )
    watch.add_argument("names", nargs="*", metavar="NAME")
    watch.add_argument("-l", "--selector", metavar="SELECTOR", help="label selector, e.g. app=web")
    watch.add_argument("--timeout", type=duration, metavar="DURATION", help="default: no limit")
    return watch


def _add_abort(commands: _Commands) -> argparse.ArgumentParser:
    abort = commands.add_parser(
        "abort",
        help="delete a BlockPull and wait until its job is cancelled and the object gone",
        description="Delete the BlockPull NAME; its agent cancels the QEMU job (the disk keeps "
        "its backing chain) and lets the object go. Returns once it is gone, printing how far "
        "the pull got.",
    )
    abort.add_argument("name", metavar="NAME")
    abort.add_argument(
        "--timeout",
        type=_positive_duration,
        metavar="DURATION",
        default=DEFAULT_ABORT_TIMEOUT,
        help="give up waiting after this (default: 2m)",
    )
    return abort


def _pflag_style(argv: list[str]) -> list[str]:
    """kubectl (pflag) takes `-n=vms`; argparse would read the value as `=vms`."""
    out: list[str] = []
    for arg in argv:
        if len(arg) > 3 and arg[0] == "-" and arg[1] != "-" and arg[2] == "=":
            out += [arg[:2], arg[3:]]
        else:
            out.append(arg)
    return out


def parse(argv: list[str]) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(_pflag_style(argv))
    if args.all_namespaces and args.command != "watch":
        parser.error(f"-A/--all-namespaces is for watch only, not {args.command}")
    if args.all_namespaces and getattr(args, "names", None):
        parser.error("a BlockPull cannot be named across all namespaces: give -n NAMESPACE instead of -A")
    if args.command == "create" and args.timeout is not None and not args.wait:
        parser.error("--timeout needs --wait with create")
    return args
