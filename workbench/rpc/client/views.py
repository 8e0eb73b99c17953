"""HTML views of sessions and modules, for notebooks (plain strings: no Jupyter import).

    >>> remote            # in JupyterLab: address, key, devices, workspace files   # doctest: +SKIP
"""
from __future__ import annotations

from html import escape
from typing import TYPE_CHECKING, Any, Iterable

from ...errors import RPCError
from ..tracker.summary import devices_text

if TYPE_CHECKING:
    from .session import RemoteModule, RPCSession

_STYLE = "border-collapse:collapse;text-align:left"
_CELL = "padding:1px 10px 1px 0;text-align:left;vertical-align:top"


def table(title: str, rows: Iterable[tuple[str, Any]]) -> str:
    """A two-column HTML table under a bold title; values are escaped."""
    body = "".join(
        f'<tr><th style="{_CELL}">{escape(name)}</th><td style="{_CELL}">{escape(str(value))}</td></tr>'
        for name, value in rows
    )
    return f'<div><b>{escape(title)}</b><table style="{_STYLE}">{body}</table></div>'


def session_html(session: "RPCSession") -> str:
    info = session.info
    state = "open" if session._ended is None else f"ended: {session._ended}"
    rows: list[tuple[str, Any]] = [("address", session.address), ("state", state)]
    if info.get("key"):
        rows.append(("key", info["key"]))
    rows += [
        ("architecture", f"{info.get('arch', '?')} ({info.get('target') or info.get('system', '?')})"),
        ("devices", devices_text(info.get("devices", []), info.get("device_details")) or "none"),
    ]
    if info.get("session_timeout"):
        rows.append(("session timeout", f"{info['session_timeout']:g} s"))
    if session._ended is None:
        try:
            files = session.listdir(".")
            rows.append(("workspace", ", ".join(files) if files else "(empty)"))
        except RPCError as exc:
            rows.append(("workspace", f"unavailable: {exc}"))
    return table(f"{type(session).__name__}", rows)


def module_html(module: "RemoteModule") -> str:
    rows = [
        ("file", module.path),
        ("functions", ", ".join(module.function_names) or "(none)"),
        ("session", module.session.address),
    ]
    if module.entry_name:
        rows.insert(2, ("entry", module.entry_name))
    return table("RemoteModule", rows)
