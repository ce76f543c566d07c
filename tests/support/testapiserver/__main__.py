"""``python -m testapiserver``: serve the stand-in until SIGTERM/SIGINT (used by the demo).

Writes the kubeconfig once listening, then prints the URL on stdout (one line, flushed), so a
caller can wait for either.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from pathlib import Path

from testapiserver.server import APIServer


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m testapiserver", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    parser.add_argument("--kubeconfig", type=Path, help="write a kubeconfig here once listening")
    parser.add_argument("--user", default="admin", help="the kubeconfig's user (bearer token)")
    parser.add_argument("--namespace", default="default", help="the kubeconfig's namespace")
    parser.add_argument(
        "--crd",
        type=Path,
        action="append",
        default=[],
        help="a YAML file whose objects (CRDs first) are created at start",
    )
    parser.add_argument("--create-namespace", action="append", default=[], metavar="NAME")
    parser.add_argument("--verbose", action="store_true")
    return parser.parse_args(argv)


async def serve(args: argparse.Namespace) -> None:
    server = APIServer(host=args.host, port=args.port)
    for name in args.create_namespace:
        if not server.store.namespace_exists(name):
            server.create_namespace(name)
    for path in args.crd:
        server.load_yaml(path)
    await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if args.kubeconfig:
        server.write_kubeconfig(args.kubeconfig, args.user, args.namespace)
    print(server.url, flush=True)
    try:
        await stop.wait()
    finally:
        await server.stop()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING, stream=sys.stderr)
    asyncio.run(serve(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
