"""The machinery the three network services share (server, tracker, proxy).

``process`` starts a service in its own process and hands its owner a
``ServiceHandle`` (port, pid, ``terminate()``); the child reads its config on
stdin and says ``ready PORT``. ``loop`` is the single-threaded event loop each
service subclasses: listener, owner's pipe, signals, pauses at the
file-descriptor limit. Nothing here knows any protocol; it imports nothing else
of ``workbench.rpc``.
"""
