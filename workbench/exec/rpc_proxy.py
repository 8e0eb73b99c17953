"""Start an RPC proxy (same flags as ``python -m tvm.exec.rpc_proxy``).

    python -m workbench.exec.rpc_proxy --host 0.0.0.0 --port 9090 --port-end 9091 --tracker 127.0.0.1:9190

Servers reach it with ``rpc_server --host PROXY --port PORT --through-proxy --key K``;
clients connect to it as to a server, with the key. Runs until Ctrl-C or SIGTERM.
"""
from __future__ import annotations

import argparse
import sys

from ..rpc.proxy import serve_proxy
from .rpc_server import parse_tracker


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m workbench.exec.rpc_proxy", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (0.0.0.0: every interface)")
    parser.add_argument("--port", type=int, default=9090, help="first port to try (0: any free port)")
    parser.add_argument("--port-end", type=int, default=9199, help="end of the port range (exclusive)")
    parser.add_argument("--tracker", type=parse_tracker, help="tracker HOST:PORT to offer the waiting servers to")
    parser.add_argument("--custom-addr", default=None, help="address of this proxy to report to the tracker")
    parser.add_argument("--silent", action="store_true", help="log warnings only")
    args = parser.parse_args(argv)
    config = {"host": args.host, "port": args.port, "port_end": args.port_end, "silent": args.silent,
              "tracker_addr": list(args.tracker) if args.tracker else None, "custom_addr": args.custom_addr}
    try:
        serve_proxy(config)
    except OSError as exc:
        print(f"rpc_proxy: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
