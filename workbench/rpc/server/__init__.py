"""The session server: ``Server``, its event loop, a worker per session, the request handlers.

``server`` is the owner's handle (``rpc.Server``) and its configuration;
``serve`` the server process (handshakes in one loop, a forked worker per
session); ``worker`` one session's life on the serving side; ``handler`` the
answers to every request (files, modules, tensors, calls, timing); ``minrpc``
the handle of the C server. It never imports ``client``.
"""
