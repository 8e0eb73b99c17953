"""The proxy: pairs clients with servers that cannot be reached directly.

``proxy`` is ``rpc.Proxy`` and its event loop: servers started with
``is_proxy=True`` wait there, and a client connecting with a key is paired with
one of them; from then on ``wire.relay`` copies the bytes both ways.
"""
