"""``TrackerSummary``: a tracker's SUMMARY answer, with tables for people.

It is the plain dict the tracker sent (so code reading ``["queue_info"]``
keeps working), plus rows, pandas frames and an HTML view:

    >>> s = TrackerSummary({"queue_info": {"rasp": {"free": 1, "pending": 0}},
    ...                     "server_info": [{"key": "server:rasp", "addr": ["10.0.0.7", 9091]}]})
    >>> s.key_rows()
    [{'key': 'rasp', 'total': 1, 'free': 1, 'pending': 0}]
    >>> s.server_rows()[0]["address"]
    '10.0.0.7:9091'

Works on a TVM tracker's answer too: fields it does not send come out as "".
"""
from __future__ import annotations

import functools
import re
from typing import TYPE_CHECKING, Any, Iterable

if TYPE_CHECKING:
    import pandas

KEY_COLUMNS = ("key", "total", "free", "pending")
SERVER_COLUMNS = ("address", "key", "arch", "target", "devices", "labels")


class TrackerSummary(dict):
    """What ``TrackerSession.summary()`` returns: the SUMMARY dict with table views.

        >>> summary = rpc.connect_tracker("127.0.0.1", 9190).summary()  # doctest: +SKIP
        >>> summary.keys_frame()                                         # doctest: +SKIP
    """

    # -- rows -----------------------------------------------------------------------------
    def key_rows(self) -> list[dict[str, Any]]:
        """One row per device key, sorted: ``{key, total, free, pending}``.

        ``total`` counts the servers registered for the key (a proxy entry counts
        for each key it serves). Keys with no server, nothing free and nobody
        waiting (a queue the tracker keeps after its last server left) are left out.
        """
        totals: dict[str, int] = {}
        for server in self._servers():
            for key in server_keys(str(server.get("key", ""))):
                totals[key] = totals.get(key, 0) + 1
        queues = self._queues()
        rows = []
        for key in sorted(set(queues) | set(totals)):
            queue = queues.get(key)
            queue = queue if isinstance(queue, dict) else {}
            row = {"key": key, "total": totals.get(key, 0), "free": _int(queue.get("free")),
                   "pending": _int(queue.get("pending"))}
            if row["total"] or row["free"] or row["pending"]:
                rows.append(row)
        return rows

    def server_rows(self) -> list[dict[str, str]]:
        """One row per registered server, sorted by key then address.

        ``{address "host:port", key, arch, target, devices "cpu(0), cl(0)", labels "board=pi4, os=linux"}``;
        ``key`` is the device key (``"a, b"`` for a proxy serving two keys); missing fields are "".
        """
        rows = []
        for server in self._servers():
            raw_key = server.get("key")
            rows.append({
                "address": _address(server.get("addr")),
                "key": ", ".join(server_keys(str(raw_key))) if raw_key else "",
                "arch": _text(server.get("arch")),
                "target": _text(server.get("target")),
                "devices": devices_text(server.get("devices"), server.get("device_details")),
                "labels": _labels(server.get("labels")),
            })
        rows.sort(key=lambda r: (r["key"], r["address"]))
        return rows

    def position(self, key: str, user: str) -> int | None:
        """``user``'s 1-based place in the queue of ``key``; None if not waiting (or the tracker does not say).

            >>> TrackerSummary({"queue_info": {}, "waiting": {"k": [{"user": "a"}, {"user": "b"}]}}).position("k", "b")
            2
        """
        for place, entry in enumerate(self.waiting(key), start=1):
            if isinstance(entry, dict) and entry.get("user") == user:
                return place
        return None

    def waiting(self, key: str) -> list[dict[str, Any]]:
        """The requests waiting for ``key`` (``{"user", "priority"}``) in the order they will be served.

        Read from the summary's ``waiting[key]`` (ours); [] when the tracker does not say (TVM's).
        """
        top = self.get("waiting")
        waiting = top.get(key) if isinstance(top, dict) else None
        return [entry for entry in waiting if isinstance(entry, dict)] if isinstance(waiting, list) else []

    # -- frames and display ---------------------------------------------------------------
    def keys_frame(self) -> "pandas.DataFrame":
        """``key_rows()`` as a DataFrame (columns key, total, free, pending, even when empty)."""
        import pandas

        return pandas.DataFrame(self.key_rows(), columns=list(KEY_COLUMNS))

    def servers_frame(self) -> "pandas.DataFrame":
        """``server_rows()`` as a DataFrame (columns address, key, arch, target, devices, labels)."""
        import pandas

        return pandas.DataFrame(self.server_rows(), columns=list(SERVER_COLUMNS))

    def _repr_html_(self) -> str:
        keys, servers = self.keys_frame(), self.servers_frame()
        parts = ["<h4>Queues</h4>"]
        parts.append(keys.to_html(index=False) if len(keys) else "<p><i>no device keys</i></p>")
        parts.append("<h4>Servers</h4>")
        parts.append(servers.to_html(index=False) if len(servers) else "<p><i>no servers registered</i></p>")
        return "\n".join(parts)

    def __repr__(self) -> str:
        return format_summary(self).rstrip("\n")

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:
        printer.text(repr(self))

    # -- reading the raw answer -----------------------------------------------------------
    def _servers(self) -> Iterable[dict[str, Any]]:
        servers = self.get("server_info")
        return [s for s in servers if isinstance(s, dict)] if isinstance(servers, list) else []

    def _queues(self) -> dict[str, Any]:
        queues = self.get("queue_info")
        return queues if isinstance(queues, dict) else {}


def _int(value: Any) -> int:
    try:
        return int(value or 0)
    except (TypeError, ValueError):
        return 0


def _text(value: Any) -> str:
    return "" if value is None else str(value)


def _address(addr: Any) -> str:
    if isinstance(addr, (list, tuple)) and len(addr) == 2:
        host, port = addr
        host = "?" if host is None else str(host)
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    return _text(addr)


def devices_text(devices: Any, details: Any = None) -> str:
    """``"cpu(0), cl(0) pthread-skylake (2 CU, work-group 4096, 21.5 GiB)"``: names, with what a server says of them."""
    from ...runtime.devices import device_name

    if not isinstance(devices, list):
        return ""
    said = {tuple(d["device"]): d for d in details if isinstance(d, dict) and isinstance(d.get("device"), list)} \
        if isinstance(details, list) else {}
    names = []
    for entry in devices:
        if isinstance(entry, (list, tuple)) and len(entry) == 2 and all(isinstance(v, int) for v in entry):
            names.append(device_name(entry[0], entry[1]) + _device_summary(said.get(tuple(entry))))
        else:
            names.append(str(entry))
    return ", ".join(names)


def _device_summary(details: dict[str, Any] | None) -> str:
    if not details:
        return ""
    parts = []
    if isinstance(details.get("multi_processor_count"), int):
        parts.append(f"{details['multi_processor_count']} CU")
    if isinstance(details.get("max_threads_per_block"), int):
        parts.append(f"work-group {details['max_threads_per_block']}")
    if isinstance(details.get("total_global_memory"), int):
        parts.append(f"{details['total_global_memory'] / (1 << 30):.1f} GiB")
    name = str(details.get("device_name") or "")
    text = f" {name[:40]}" if name else ""
    return text + (f" ({', '.join(parts)})" if parts else "")


def _labels(labels: Any) -> str:
    if not isinstance(labels, dict):
        return ""
    return ", ".join(f"{name}={value}" for name, value in sorted(labels.items(), key=lambda kv: str(kv[0])))


@functools.lru_cache(maxsize=8192)
def _server_keys(info_key: str) -> tuple[str, ...]:
    name = info_key.split(":", 1)[1] if ":" in info_key else info_key
    proxied = re.fullmatch(r"proxy\[(.*)\](?::.*)?", name)
    if proxied:
        return tuple(k for k in proxied.group(1).split(",") if k)
    return (name,)


def server_keys(info_key: str) -> list[str]:
    """The device keys behind a server-list entry: ``server:rasp`` or ``server:proxy[a,b]``."""
    return list(_server_keys(info_key))


def format_summary(data: dict[str, Any]) -> str:
    """The "Server List" and "Queue Status" tables of seed 003."""
    servers = sorted(data.get("server_info", []), key=lambda s: str(s.get("key", "")))
    totals: dict[str, int] = {}
    addrs = [":".join(map(str, s.get("addr") or ["?", "?"])) for s in servers]
    column = max([24] + [len(a) + 2 for a in addrs])  # a long address never runs into its key
    rule = "-" * max([40] + [column + len(str(s.get("key", ""))) for s in servers])
    lines = ["Server List", rule, f"{'server-address':<{column}}key", rule]
    for server, addr in zip(servers, addrs):
        lines.append(f"{addr:<{column}}{server.get('key', '')}")
        for key in server_keys(str(server.get("key", ""))):
            totals[key] = totals.get(key, 0) + 1
    lines += [rule, ""]
    queues = data.get("queue_info", {})
    keys = sorted(set(queues) | set(totals))
    width = max([len(k) for k in keys] + [len("key")]) + 2
    title = f"{'key':<{width}}total  free  pending"
    lines += ["Queue Status", "-" * len(title), title, "-" * len(title)]
    for key in keys:
        queue = queues.get(key, {})
        total, free, pending = totals.get(key, 0), queue.get("free", 0), queue.get("pending", 0)
        if total or free or pending:
            lines.append(f"{key:<{width}}{total:<7d}{free:<6d}{pending:d}")
    lines.append("-" * len(title))
    return "\n".join(lines) + "\n"
