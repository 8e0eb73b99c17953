"""Start an RPC proxy (same flags as ``python -m tvm.exec.rpc_proxy``).

    python -m workbench.exec.rpc_proxy --host 0.0.0.0 --port 9090 --port-end 9091 --tracker 127.0.0.1:9190

Servers reach it with ``rpc_server --host PROXY --port PORT --through-proxy --key K``;
clients connect to it as to a server, with the key. Runs until Ctrl-C or SIGTERM.
A client whose key's servers are busy or were here within the last minute waits
up to --timeout-client seconds for one to come back.

    WORKBENCH_PROXY_TOKEN=secret python -m workbench.exec.rpc_proxy --port 9090

With a token (--auth-token or WORKBENCH_PROXY_TOKEN) only servers started with
the same --registration-token may wait at the proxy. --registration-token (or
WORKBENCH_REGISTRATION_TOKEN) is what the proxy proves to a --tracker that has
an auth token.
"""
from __future__ import annotations

import argparse
import os
import sys

from ..rpc.tracker.registration import PROXY_TOKEN_ENV, REGISTRATION_TOKEN_ENV
from ..rpc.proxy.proxy import (
    HANDSHAKE_TIMEOUT_S,
    MAX_CLIENTS,
    MAX_CLIENTS_PER_SOURCE,
    PAIRING_TIMEOUT_S,
    TIMEOUT_CLIENT_S,
    UNKNOWN_KEY_GRACE_S,
    serve_proxy,
)
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
    parser.add_argument("--timeout-client", type=float, default=TIMEOUT_CLIENT_S, metavar="S",
                        help="seconds a client waits for a server of its key to come back (default %(default)g; "
                             "0: refuse at once); keep it below the clients' connect timeout (10 s)")
    parser.add_argument("--unknown-key-grace", type=float, default=UNKNOWN_KEY_GRACE_S, metavar="S",
                        help="seconds a client of a key no server has had here waits for one that is starting "
                             "(default %(default)g, at most --timeout-client; 0: refuse it at once)")
    parser.add_argument("--handshake-timeout", type=float, default=HANDSHAKE_TIMEOUT_S, metavar="S",
                        help="seconds a new connection has to send its opening (default %(default)g)")
    parser.add_argument("--pairing-timeout", type=float, default=PAIRING_TIMEOUT_S, metavar="S",
                        help="seconds a paired client has to send its CONNECT (default %(default)g)")
    parser.add_argument("--max-clients", type=int, default=MAX_CLIENTS, metavar="N",
                        help="clients held or being paired at once, from all addresses (default %(default)d, and at "
                             "most half the file-descriptor limit)")
    parser.add_argument("--max-clients-per-source", type=int, default=MAX_CLIENTS_PER_SOURCE, metavar="N",
                        help="an address's share: when the proxy is full, only an address holding more clients than "
                             "this (and the most) gives up its newest to make room (default %(default)d)")
    parser.add_argument("--auth-token", default=None, metavar="TOKEN",
                        help=f"servers must prove this token to wait here (their --registration-token / "
                             f"{REGISTRATION_TOKEN_ENV}). Prefer the {PROXY_TOKEN_ENV} variable: command lines are "
                             "visible to other users")
    parser.add_argument("--registration-token", default=None, metavar="TOKEN",
                        help=f"the token to prove to a --tracker started with --auth-token (prefer the "
                             f"{REGISTRATION_TOKEN_ENV} variable)")
    args = parser.parse_args(argv)
    config = {"host": args.host, "port": args.port, "port_end": args.port_end, "silent": args.silent,
              "tracker_addr": list(args.tracker) if args.tracker else None, "custom_addr": args.custom_addr,
              "timeout_client": args.timeout_client, "handshake_timeout": args.handshake_timeout,
              "pairing_timeout": args.pairing_timeout, "max_clients_per_source": args.max_clients_per_source,
              "max_clients": args.max_clients, "unknown_key_grace": args.unknown_key_grace,
              "auth_token": args.auth_token or os.environ.get(PROXY_TOKEN_ENV) or None,
              "registration_token": args.registration_token or os.environ.get(REGISTRATION_TOKEN_ENV) or None}
    try:
        serve_proxy(config)
    except ValueError as exc:
        parser.error(str(exc))
    except OSError as exc:
        print(f"rpc_proxy: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
