"""The tracker: one queue of devices per key, on TVM's wire format.

``tracker`` is ``rpc.Tracker`` and its event loop; ``wire`` TVM's
length-prefixed JSON messages; ``summary`` the SUMMARY answer with tables for
people; ``registration`` how a server or proxy stays registered (and proves its
token). Servers, proxies and clients import its ``wire``, ``summary`` and
``registration``; it imports none of them.
"""
