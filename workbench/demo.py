"""The headless demo: compile a C kernel here, run and time it on an RPC server.

    python -m workbench.demo                       # on an embedded local farm (tracker + server)
    WORKBENCH_TRACKER=host:port python -m workbench.demo --key rasp   # on a farm of yours
    python -m workbench.demo --connect HOST:PORT   # on one server, directly

It shows the seed tutorial's flow (cross-compilation and RPC) with the host
compiler: build ``add_one``, upload it, load it, run it on remote tensors,
check the result, and time it with ``time_evaluator``.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile

import numpy as np

from . import cc, rpc, runtime
from .errors import WorkbenchError
from .farm import LocalFarm, parse_address, tracker_from_env
from .results.benchmark import format_seconds

ADD_ONE_C = r"""
#include <workbench_kernel.h>

WB_KERNEL(add_one) {
  WB_EXPECT_ARGS(2);
  DLTensor* a = WB_ARG_TENSOR_OF(0, float32, 1);
  DLTensor* b = WB_ARG_TENSOR_OF(1, float32, 1);
  const float* x = (const float*)a->data;
  float* y = (float*)b->data;
  for (int64_t i = 0; i < a->shape[0]; ++i) y[i] = x[i] + 1.0f;
  return 0;
}
"""


def run(remote: rpc.RPCSession, n: int = 1024) -> None:
    with tempfile.TemporaryDirectory(prefix="wb-demo-") as tmp:
        src = os.path.join(tmp, "add_one.c")
        with open(src, "w") as f:
            f.write(ADD_ONE_C)
        lib = cc.create_tar(os.path.join(tmp, "lib.tar"), [src])
        print(f"compiled add_one.c -> {os.path.basename(lib)} (objects, linked on the device)")
        remote.upload(lib)
    func = remote.load_module("lib.tar")
    print(f"loaded on {remote.address} ({remote.info['arch']}): {func.function_names}")
    dev = remote.cpu()
    a = runtime.tensor(np.random.uniform(size=n).astype("float32"), dev)
    b = runtime.tensor(np.zeros(n, dtype="float32"), dev)
    func["add_one"](a, b)
    np.testing.assert_equal(b.numpy(), a.numpy() + 1)
    print("add_one ran on the device: b == a + 1")
    timer = func.time_evaluator("add_one", dev, number=100, repeat=5)
    result = timer(a, b)
    print(result)
    frame = result.to_frame()
    frame["time per call"] = frame.pop("seconds").map(format_seconds)
    print(frame.to_string(index=False))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m workbench.demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--connect", metavar="HOST:PORT", help="an RPC server to use directly")
    parser.add_argument("--key", default="local", help="the device key to request from the tracker")
    parser.add_argument("--timeout", type=float, default=60.0, metavar="S",
                        help="give up waiting for a device after S seconds (default 60)")
    args = parser.parse_args(argv)
    if args.timeout <= 0:
        parser.error("--timeout must be > 0 seconds")
    logging.basicConfig(level=logging.WARNING)
    try:
        return _run(args)
    except (WorkbenchError, OSError, ValueError) as exc:  # one line, no traceback: what went wrong and what to do
        print(f"python -m workbench.demo: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1


def _run(args: argparse.Namespace) -> int:
    if args.connect:
        host, port = parse_address(args.connect, "server")
        with rpc.connect(host, port, key=args.key if args.key != "local" else "", connect_timeout=args.timeout) as remote:
            run(remote)
        return 0
    configured = tracker_from_env()
    if configured:
        print(f"using the tracker at {configured[0]}:{configured[1]}")
        with rpc.connect_tracker(*configured) as tracker, tracker.request(args.key, timeout=args.timeout) as remote:
            run(remote)
        return 0
    with LocalFarm({args.key: 1}) as farm:
        print(f"started a local device farm: tracker at {farm.tracker_addr[0]}:{farm.tracker_addr[1]}, "
              f"one server of key {args.key!r}")
        with farm.request(args.key, timeout=args.timeout) as remote:
            run(remote)
    return 0


if __name__ == "__main__":
    sys.exit(main())
