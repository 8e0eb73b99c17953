"""Start an RPC tracker (same flags as ``python -m tvm.exec.rpc_tracker``).

    python -m workbench.exec.rpc_tracker --host 0.0.0.0 --port 9190 --port-end 9199

Runs in the foreground until Ctrl-C or SIGTERM. TVM servers and TVM's
query_rpc_tracker work with it as with TVM's own tracker. A connection that
sends nothing, or does not read its replies, is closed after the timeouts below
(0: never); servers and waiting requests are never idle.

    WORKBENCH_TRACKER_TOKEN=secret python -m workbench.exec.rpc_tracker --port 9190

With a token (--auth-token or WORKBENCH_TRACKER_TOKEN) only servers started
with the same --registration-token may register; TVM's own rpc_server cannot
(its registration is refused and logged), so leave it off for TVM servers.
Clients need no token to request devices or read the summary.
"""
from __future__ import annotations

import argparse
import os
import sys

from ..rpc.tracker.registration import REGISTRATION_TOKEN_ENV, TRACKER_TOKEN_ENV
from ..rpc.tracker.tracker import HANDSHAKE_TIMEOUT_S, IDLE_TIMEOUT_S, WRITE_TIMEOUT_S, serve_tracker


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m workbench.exec.rpc_tracker", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (0.0.0.0: every interface)")
    parser.add_argument("--port", type=int, default=9190, help="first port to try (0: any free port)")
    parser.add_argument("--port-end", type=int, default=9199, help="end of the port range (exclusive)")
    parser.add_argument("--silent", action="store_true", help="log warnings only")
    parser.add_argument("--handshake-timeout", type=float, default=HANDSHAKE_TIMEOUT_S, metavar="S",
                        help="seconds a new connection has to send the tracker magic (default %(default)g)")
    parser.add_argument("--idle-timeout", type=float, default=IDLE_TIMEOUT_S, metavar="S",
                        help="close a client connection (not a server's, none with a request waiting) "
                             "silent for this long (default %(default)g; 0: never)")
    parser.add_argument("--write-timeout", type=float, default=WRITE_TIMEOUT_S, metavar="S",
                        help="close a connection that reads none of its replies for this long (default %(default)g)")
    parser.add_argument("--auth-token", default=None, metavar="TOKEN",
                        help=f"servers must prove this token to register (their --registration-token / "
                             f"{REGISTRATION_TOKEN_ENV}); TVM's own servers then cannot register. Prefer the "
                             f"{TRACKER_TOKEN_ENV} variable: command lines are visible to other users")
    args = parser.parse_args(argv)
    config = {"host": args.host, "port": args.port, "port_end": args.port_end, "silent": args.silent,
              "handshake_timeout": args.handshake_timeout, "idle_timeout": args.idle_timeout,
              "write_timeout": args.write_timeout,
              "auth_token": args.auth_token or os.environ.get(TRACKER_TOKEN_ENV) or None}
    try:
        serve_tracker(config)
    except ValueError as exc:
        parser.error(str(exc))
    except OSError as exc:
        print(f"rpc_tracker: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
