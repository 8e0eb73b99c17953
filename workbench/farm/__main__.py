"""Run a device farm on this machine until Ctrl-C.

    python -m workbench.farm                         # one server of key "local"
    python -m workbench.farm --servers local=2 arm=1
    python -m workbench.farm --servers local=1 aarch64-qemu=1 minrpc=1

Keys: "minrpc" is the native server built for this machine; "<arch>-qemu"
(aarch64-qemu, armhf-qemu, or a triple: aarch64-linux-gnu-qemu) is an emulated
board: minrpc cross-compiled and run under qemu-user (Debian: qemu-user,
gcc-<triple>, libc6-dev-<arch>-cross); any other key is a Python server.

Prints the tracker's address (export it as WORKBENCH_TRACKER=host:port) and its
summary; runs until Ctrl-C or SIGTERM, then ends every server it started.
"""
from __future__ import annotations

import argparse
import signal
import sys
import threading

from ..cc.targets import ToolchainNotFoundError
from ..native import MinRPCBuildError
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
    except (ToolchainNotFoundError, MinRPCBuildError) as exc:  # what to install, or the compiler's output
        print(f"{parser.prog}: error: {exc}", file=sys.stderr, flush=True)
        return 2
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
