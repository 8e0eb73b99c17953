"""``python -m workbench.rpc.server``: the server process ``rpc.Server`` starts (its config on stdin,
see ``workbench.rpc.service.process``).

It forks the child that lists the OpenCL devices before importing the rest, so the probe (PoCL takes
about 50 ms to start) runs while the server imports and binds; the process has no threads and no
tokens yet.
"""
from ...runtime import opencl_probe

opencl_probe.start()

from .serve import main  # noqa: E402  (after the probe started, on purpose)

main()
