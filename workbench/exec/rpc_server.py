"""Start an RPC server (same flags as ``python -m tvm.exec.rpc_server``).

    python -m workbench.exec.rpc_server --host 127.0.0.1 --port 9090
    WORKBENCH_RPC_TOKEN=secret python -m workbench.exec.rpc_server --port 9090
    python -m workbench.exec.rpc_server --port 9090 --max-sessions 8 --idle-timeout 600
    python -m workbench.exec.rpc_server --port 9090 --max-workspace-bytes 16G --max-tensor-bytes 8G
    python -m workbench.exec.rpc_server --port 9090 --auth-token ... --allow-tvm-clients   # tvm.rpc.connect too
    WORKBENCH_REGISTRATION_TOKEN=secret python -m workbench.exec.rpc_server --tracker 127.0.0.1:9190 --key rasp

Runs in the foreground until Ctrl-C or SIGTERM, which also end every session.
"""
from __future__ import annotations

import argparse
import os
import sys

from ..farm.local import parse_address
from ..rpc.wire.handshake import HANDSHAKE_TIMEOUT_S, TOKEN_ENV, check_seconds
from ..rpc.tracker.registration import REGISTRATION_TOKEN_ENV
from ..rpc.server.serve import serve
from ..rpc.server.server import PREEMPT_IDLE_S, ServerConfig, callable_spec, check_max_sessions, check_quotas
from ..runtime.quota import DEFAULT_WORKSPACE_BYTES, DEFAULT_WORKSPACE_FILES, format_size
from ..rpc.service.process import configure_cli_logging


def parse_tracker(text: str | None) -> tuple[str, int] | None:
    if not text:
        return None
    try:
        return parse_address(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--tracker takes HOST:PORT, not {text!r}") from None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m workbench.exec.rpc_server", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (0.0.0.0: every interface)")
    parser.add_argument("--port", type=int, default=9090, help="first port to try (0: any free port)")
    parser.add_argument("--port-end", type=int, default=9199, help="end of the port range (exclusive)")
    parser.add_argument("--tracker", type=parse_tracker, help="tracker address HOST:PORT to register with")
    parser.add_argument("--key", default="", help="device key, for the tracker")
    parser.add_argument("--through-proxy", action="store_true",
                        help="do not listen: connect out to a proxy at --host:--port and wait there")
    parser.add_argument("--custom-addr", default=None, help="address to report to the tracker")
    parser.add_argument("--load-library", default=None, help="kernel libraries to load, separated by ':'")
    parser.add_argument("--init", default=None, metavar="MODULE:FUNCTION", help="call this before serving (register functions)")
    parser.add_argument("--label", action="append", default=[], metavar="NAME=VALUE",
                        help="a label published to the tracker (repeatable), e.g. --label board=rpi4")
    parser.add_argument("--silent", action="store_true", help="log warnings only")
    parser.add_argument("--no-fork", action="store_true", help="start session workers as new processes instead of forking")
    parser.add_argument("--timeout", type=float, default=None,
                        help="socket timeout of a session's reads and writes, in seconds (TVM's --timeout)")
    parser.add_argument("--max-sessions", type=int, default=None, metavar="N",
                        help="sessions served at once; more clients are told 'server busy' (default: sized to the "
                             "machine, 16 per CPU from 16 to 256, within its memory and file-descriptor limit)")
    parser.add_argument("--idle-timeout", type=float, default=None, metavar="SECONDS",
                        help="end a session whose client sends no request for this long (default: never)")
    parser.add_argument("--preempt-idle", type=float, default=PREEMPT_IDLE_S, metavar="SECONDS",
                        help="when the server is full, a session idle this long gives its slot to the new client "
                             f"(default {PREEMPT_IDLE_S:g}; 0: never)")
    parser.add_argument("--handshake-timeout", type=float, default=HANDSHAKE_TIMEOUT_S, metavar="SECONDS",
                        help=f"a client must finish the whole handshake within this (default {HANDSHAKE_TIMEOUT_S:g})")
    parser.add_argument("--max-workspace-bytes", default=None, metavar="SIZE",
                        help="bytes a session's workspace may hold (uploads, expanded .tar modules, loaded copies), "
                             f"e.g. 16G (default {format_size(DEFAULT_WORKSPACE_BYTES)}; 0: no limit)")
    parser.add_argument("--max-workspace-files", default=None, metavar="N",
                        help="files and directories a session's workspace may hold "
                             f"(default {DEFAULT_WORKSPACE_FILES}; 0: no limit)")
    parser.add_argument("--max-tensor-bytes", default=None, metavar="SIZE",
                        help="memory a session's tensors may take, e.g. 8G (default: half the machine's memory, "
                             "or of its cgroup's limit; 0: no limit)")
    parser.add_argument("--auth-token", default=None,
                        help=f"accept only clients knowing this token (prefer the {TOKEN_ENV} variable: "
                             "command lines are visible to other users)")
    parser.add_argument("--registration-token", default=None, metavar="TOKEN",
                        help="the token to prove to a --tracker or proxy (--through-proxy) started with --auth-token "
                             f"(prefer the {REGISTRATION_TOKEN_ENV} variable)")
    parser.add_argument("--allow-tvm-clients", action="store_true",
                        help="with an auth token, serve TVM's own RPC client all the same (it cannot prove a "
                             "token; without a token TVM's clients are always served)")
    args = parser.parse_args(argv)
    try:
        check_max_sessions(args.max_sessions)
        check_seconds("--idle-timeout", args.idle_timeout)
        check_seconds("--preempt-idle", args.preempt_idle or None)
        check_seconds("--handshake-timeout", args.handshake_timeout, allow_none=False)
        quotas = check_quotas(args.max_workspace_bytes, args.max_workspace_files, args.max_tensor_bytes, flags=True)
    except ValueError as exc:
        parser.error(str(exc))
    labels = {}
    for label in args.label:
        name, sep, value = label.partition("=")
        if not sep or not name:
            parser.error(f"--label takes NAME=VALUE, not {label!r}")
        labels[name] = value
    libs = [os.path.abspath(p) for p in (args.load_library or "").split(":") if p]
    for lib in libs:
        if not os.path.exists(lib):
            parser.error(f"--load-library: no such file {lib!r}")
    config = ServerConfig(
        host=args.host, port=args.port, port_end=args.port_end, key=args.key, load_library=libs,
        silent=args.silent, no_fork=args.no_fork, init=callable_spec(args.init) if args.init else None,
        timeout=args.timeout, token=args.auth_token or os.environ.get(TOKEN_ENV) or None,
        tracker_addr=args.tracker, is_proxy=args.through_proxy, custom_addr=args.custom_addr, labels=labels,
        max_sessions=args.max_sessions, idle_timeout=args.idle_timeout, handshake_timeout=args.handshake_timeout,
        preempt_idle=args.preempt_idle or None,
        registration_token=args.registration_token or os.environ.get(REGISTRATION_TOKEN_ENV) or None,
        **quotas,
        allow_tvm_clients=args.allow_tvm_clients,
    )
    configure_cli_logging(args.silent)
    try:
        serve(config)
    except OSError as exc:
        print(f"rpc_server: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
