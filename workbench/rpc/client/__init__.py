"""The user's side: sessions and the tracker client.

``session`` is ``connect`` and ``RPCSession`` with its ``RemoteModule`` and
``RemoteFunction``; ``local`` the sessions without a network (``LocalSession``
in this process, ``PopenSession`` over pipes); ``tracker_session`` asks a
tracker for devices (``connect_tracker``); ``views`` renders sessions for
notebooks. It speaks through ``wire`` and reads the tracker's formats from
``tracker``; only ``LocalSession`` reaches into ``server`` (it serves itself).
"""
