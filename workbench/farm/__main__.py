"""Run a device farm on this machine until Ctrl-C.

    python -m workbench.farm                         # one server of key "local"
    python -m workbench.farm --servers local=2 arm=1

Prints the tracker's address (export it as WORKBENCH_TRACKER=host:port) and its summary.
"""
from __future__ import annotations

import argparse
import signal
import sys
import threading

from .local import LocalFarm


def parse_servers(items: list[str]) -> dict[str, int]:
    out = {}
    for item in items:
        key, sep, count = item.partition("=")
        if not key or (sep and not count.isdigit()):
            raise argparse.ArgumentTypeError(f"--servers takes KEY or KEY=COUNT, not {item!r}")
        out[key] = int(count) if sep else 1
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m workbench.farm", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--servers", nargs="+", default=["local=1"], metavar="KEY=COUNT")
    parser.add_argument("--host", default="127.0.0.1")
    args = parser.parse_args(argv)
    try:
        servers = parse_servers(args.servers)
    except argparse.ArgumentTypeError as exc:
        parser.error(str(exc))
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        farm = LocalFarm(servers, host=args.host)
    except ValueError as exc:
        parser.error(str(exc))
    with farm:
        host, port = farm.tracker_addr
        print(f"Tracker address {host}:{port}   (export WORKBENCH_TRACKER={host}:{port})\n", flush=True)
        with farm.connect() as tracker:
            print(tracker.text_summary(), flush=True)
        try:
            while not stop.wait(1.0):
                pass
        except KeyboardInterrupt:
            pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
