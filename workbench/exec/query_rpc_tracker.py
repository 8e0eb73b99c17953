"""Print a tracker's server list and queue status (as ``python -m tvm.exec.query_rpc_tracker``).

    python -m workbench.exec.query_rpc_tracker --host 127.0.0.1 --port 9190
"""
from __future__ import annotations

import argparse
import os
import sys

from ..errors import RPCError
from ..rpc.client.tracker_session import connect_tracker


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m workbench.exec.query_rpc_tracker", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default=os.environ.get("TVM_TRACKER_HOST", "127.0.0.1"))
    parser.add_argument("--port", type=int, default=int(os.environ.get("TVM_TRACKER_PORT", "9190")))
    args = parser.parse_args(argv)
    try:
        with connect_tracker(args.host, args.port) as tracker:
            text = tracker.text_summary()
    except (OSError, RPCError) as exc:
        print(f"query_rpc_tracker: {exc}", file=sys.stderr)
        return 1
    print(f"Tracker address {args.host}:{args.port}\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
