"""What both ends of a session share: the frame format, the handshake and its auth proofs.

``protocol`` holds the data plane's frames and channels (docs/protocol.md),
``handshake`` the rules of opening a session on either side (checks, HMAC
proofs, the client's half), ``exits`` how a worker's end reads to its peers,
``buffers`` large receive buffers, and ``relay`` the byte pump between two
sockets. It imports nothing else of ``workbench.rpc``.
"""
