"""``DevicePicker``: a live view of a tracker's queues and servers, and a Connect button.

    >>> from workbench.notebook import DevicePicker
    >>> picker = DevicePicker("127.0.0.1:9190")      # doctest: +SKIP
    >>> picker                                       # doctest: +SKIP   (the panel; Connect binds `remote`)
    >>> picker.close()                               # doctest: +SKIP

One background thread per picker polls the tracker (every ``interval``
seconds, backing off while it is unreachable) and updates only the table rows
that changed; Connect asks for a device in a second thread, so the kernel
stays free while the request waits in the queue. Both threads end with
``close()``, when the picker is collected, or when the interpreter exits.
Without ipywidgets the picker shows a static HTML summary instead.
"""
from __future__ import annotations

import functools
import html
import logging
import sys
import threading
import time
import weakref
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Sequence

from ..errors import RPCError
from ..rpc.tracker.summary import TrackerSummary

if TYPE_CHECKING:
    from ..rpc.client.session import RPCSession
    from ..rpc.client.tracker_session import TrackerSession

log = logging.getLogger("workbench.notebook.picker")

BACKOFF_MAX_S = 10.0
POLL_IO_TIMEOUT_S = 3.0  # one SUMMARY round trip; below JOIN_TIMEOUT_S so close() never waits it out
JOIN_TIMEOUT_S = 5.0

# (heading, CSS grid column width, right-aligned)
KEY_CELLS = (("key", "16em", False), ("free", "5em", True), ("total", "5em", True), ("waiting", "6em", True))
SERVER_CELLS = (("address", "13em", False), ("key", "10em", False), ("arch", "7em", False),
                ("triple", "15em", False), ("device types", "11em", False), ("labels", "minmax(10em, 1fr)", False))

_ROW_STYLE = (
    "display:grid;grid-template-columns:{columns};column-gap:1em;padding:1px 6px;"
    "border-bottom:1px solid var(--jp-border-color2, rgba(128,128,128,0.35));color:inherit;"
    "font-family:var(--jp-code-font-family, monospace);font-size:var(--jp-code-font-size, 12px);line-height:1.7"
)
_CELL_STYLE = "overflow:hidden;text-overflow:ellipsis;white-space:nowrap"
_ERROR_STYLE = "color:var(--jp-error-color1, #d32f2f)"
_MUTED_STYLE = "color:var(--jp-ui-font-color2, gray)"


def _ipywidgets() -> Any:
    """The ipywidgets module, or None when it is not installed."""
    try:
        import ipywidgets
    except ImportError:
        return None
    return ipywidgets


def _ipython_shell() -> Any:
    """The running IPython shell, or None (IPython is never imported here)."""
    module = sys.modules.get("IPython")
    get_ipython = getattr(module, "get_ipython", None) if module is not None else None
    return get_ipython() if get_ipython is not None else None


def _ordinal(n: int) -> str:
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


def describe_wait(status: Any) -> str:
    """One line for a queued request: ``"2nd in the queue for 'local', waited 3 s"``.

    ``status`` has ``key``, ``waited`` (seconds), ``position`` (1-based or None) and ``pending`` (or None).
    """
    waited = f"waited {float(getattr(status, 'waited', 0) or 0):.0f} s"
    key, position, pending = status.key, getattr(status, "position", None), getattr(status, "pending", None)
    if position is not None:
        return f"{_ordinal(int(position))} in the queue for {key!r}, {waited}"
    if pending:
        return f"waiting for {key!r} ({pending} request(s) queued), {waited}"
    return f"waiting for {key!r}, {waited}"


def _short(exc: BaseException, limit: int = 200) -> str:
    text = str(exc) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _row_html(cells: Sequence[tuple[str, str, bool]], values: Sequence[Any], *, head: bool = False) -> str:
    """One table row: a CSS grid with fixed column widths; text inherits the theme's colour."""
    style = _ROW_STYLE.format(columns=" ".join(width for _, width, _ in cells))
    if head:
        style += ";font-weight:bold"
    spans = []
    for (_, _, right), value in zip(cells, values):
        text = html.escape(str(value), quote=True)
        align = ";text-align:right" if right else ""
        spans.append(f'<span style="{_CELL_STYLE}{align}" title="{text}">{text}</span>')
    return f'<div style="{style}">{"".join(spans)}</div>'


def key_row_html(row: dict[str, Any]) -> str:
    """The HTML of one queue row (``TrackerSummary.key_rows()`` item): key, free, total, waiting."""
    return _row_html(KEY_CELLS, [row["key"], row["free"], row["total"], row["pending"]])


def server_row_html(row: dict[str, str]) -> str:
    """The HTML of one server row (``TrackerSummary.server_rows()`` item)."""
    return _server_row_html((row["address"], row["key"], row["arch"], row["target"], row["devices"], row["labels"]))


@functools.lru_cache(maxsize=8192)  # a poll re-renders every row; most are as they were (1000 servers: 2x faster)
def _server_row_html(values: tuple[str, ...]) -> str:
    return _row_html(SERVER_CELLS, values)


def _server_ids(rows: list[dict[str, str]]) -> list[str]:
    """A stable id per server row: its address (``#2``, ``#3`` for entries sharing one)."""
    seen: dict[str, int] = {}
    ids = []
    for row in rows:
        count = seen[row["address"]] = seen.get(row["address"], 0) + 1
        ids.append(row["address"] if count == 1 else f"{row['address']}#{count}")
    return ids


@dataclass
class _Owned:
    """What a picker owns and must end; held by its finalizer, so it never refers back to the picker."""

    stop: threading.Event = field(default_factory=threading.Event)
    lock: threading.RLock = field(default_factory=threading.RLock)  # the tracker connection and the tables
    threads: list[threading.Thread] = field(default_factory=list)
    cancel: threading.Event | None = None
    tracker: "TrackerSession | None" = None
    view: "_PickerView | None" = None

    def drop_tracker(self) -> None:
        tracker, self.tracker = self.tracker, None
        if tracker is not None:
            tracker.close()


def _shutdown(owned: _Owned) -> None:
    """Stop polling, withdraw a queued request, join the threads (bounded), close the widgets."""
    owned.stop.set()
    if owned.cancel is not None:
        owned.cancel.set()
    current = threading.current_thread()
    for thread in owned.threads:
        if thread is not current and thread.is_alive():
            thread.join(JOIN_TIMEOUT_S)
            if thread.is_alive():
                log.warning("DevicePicker: thread %r did not end within %.0f s", thread.name, JOIN_TIMEOUT_S)
    if owned.lock.acquire(timeout=JOIN_TIMEOUT_S):
        try:
            owned.drop_tracker()
        finally:
            owned.lock.release()
    if owned.view is not None:
        owned.view.close()


def _poll_loop(ref: "weakref.ref[DevicePicker]", stop: threading.Event) -> None:
    """The picker's polling thread: holds the picker only while it polls, so the picker can be collected."""
    delay = 0.0
    while not stop.wait(delay):
        picker = ref()
        if picker is None:
            return
        try:
            delay = picker._tick()
        except Exception:  # a bug in rendering must not end the updates silently
            log.exception("DevicePicker: poll failed")
            delay = picker.backoff_max
        finally:
            del picker


def _weak_callback(method: Callable[..., Any]) -> Callable[..., None]:
    """A widget callback that does not keep the picker alive (widgets live in ipywidgets' registry)."""
    ref = weakref.WeakMethod(method)

    def call(*args: Any) -> None:
        bound = ref()
        if bound is not None:
            bound(*args)

    return call


class DevicePicker:
    """A live panel of a tracker's device keys and servers; Connect binds a session into the notebook.

        >>> picker = DevicePicker("127.0.0.1:9190", interval=1.0, name="remote")   # doctest: +SKIP
        >>> picker.poll_once().key_rows()                                           # doctest: +SKIP
        [{'key': 'local', 'total': 2, 'free': 2, 'pending': 0}]
        >>> picker.connect("local")          # as pressing Connect: in the background  # doctest: +SKIP
        >>> picker.session                   # the session once connected (also `remote` in the notebook)

    ``tracker`` is ``"host:port"``, ``(host, port)`` or None (``workbench.farm.default_tracker()``).
    On Connect the session is stored in ``namespace[name]`` when a namespace dict is
    given, else in the IPython user namespace when IPython runs; ``on_connect(session)``
    is called after. ``priority`` is the tracker request's priority (higher is served
    first); while the tracker is unreachable, polls back off up to ``backoff_max`` seconds.
    Sessions are the caller's: ``close()`` leaves them open.
    """

    def __init__(
        self,
        tracker: str | tuple[str, int] | None = None,
        interval: float = 1.0,
        *,
        name: str = "remote",
        namespace: dict[str, Any] | None = None,
        on_connect: Callable[["RPCSession"], Any] | None = None,
        priority: int = 1,
        backoff_max: float = BACKOFF_MAX_S,
    ):
        from ..farm.local import parse_address

        if not interval > 0:
            raise ValueError(f"interval is the seconds between polls, a number > 0, not {interval!r}")
        if not backoff_max > 0:
            raise ValueError(f"backoff_max caps the seconds between retries, a number > 0, not {backoff_max!r}")
        if not isinstance(name, str) or not name.isidentifier():
            raise ValueError(f"name is the variable the session is bound to, a Python identifier, not {name!r}")
        if namespace is not None and not isinstance(namespace, dict):
            raise TypeError(f"namespace must be a dict (e.g. globals()), not {type(namespace).__name__}")
        self._addr: tuple[str, int] | None = parse_address(tracker) if tracker is not None else None
        self.interval = float(interval)
        self.backoff_max = max(float(backoff_max), self.interval)  # never retry faster than the polls
        self.name = name
        self.namespace = namespace
        self.on_connect = on_connect
        self.priority = priority
        self.session: RPCSession | None = None
        self.summary: TrackerSummary | None = None  # the last summary polled
        self.error: str | None = None  # why the last poll failed (None after a good one)
        self._updated: float | None = None  # time.time() of the last good poll
        self._failures = 0
        self._connect_lock = threading.Lock()
        self._connecting = False
        self._owned = _Owned()
        self._finalizer = weakref.finalize(self, _shutdown, self._owned)
        widgets = _ipywidgets()
        if widgets is not None:
            self._owned.view = _PickerView(widgets, self)
            thread = threading.Thread(target=_poll_loop, args=(weakref.ref(self), self._owned.stop),
                                      name=f"DevicePicker poll {self.tracker_address}", daemon=True)
            self._owned.threads.append(thread)
            thread.start()

    # -- public API -----------------------------------------------------------------------
    @property
    def tracker_address(self) -> str:
        """``"host:port"`` of the tracker (``"default tracker"`` until the default one is known)."""
        return "default tracker" if self._addr is None else f"{self._addr[0]}:{self._addr[1]}"

    @property
    def widget(self) -> Any:
        """The panel's root ipywidgets box (None without ipywidgets or once closed)."""
        view = self._owned.view
        return None if view is None or view.closed else view.root

    @property
    def view(self) -> "_PickerView | None":
        """The panel's parts: ``header``, ``key_rows`` / ``server_rows`` (one HTML widget per key / server
        address), ``key_select``, ``connect_button``, ``cancel_button``, ``status``; None without ipywidgets."""
        return self._owned.view

    @property
    def closed(self) -> bool:
        return not self._finalizer.alive

    def poll_once(self) -> TrackerSummary:
        """Ask the tracker for its summary now, update the tables, and return the summary.

        Raises ``RPCError`` (saying which tracker) when the tracker cannot be reached.
        """
        try:
            return self._poll()
        except (OSError, RPCError) as exc:
            self._show_unreachable(exc, None)
            raise RPCError(f"tracker {self.tracker_address} unreachable ({_short(exc)}); is it running? "
                           "(start one with: python -m workbench.exec.rpc_tracker)") from exc

    def connect(self, key: str | None = None) -> None:
        """Ask for a device of ``key`` (default: the one selected) in the background, as Connect does.

        Returns at once; ``session`` is set (and bound to ``name``) once a device is granted.
        """
        view = self._owned.view
        if key is None and view is not None:
            key = view.selected_key()
        if not key:
            self._status("choose a device key first", error=True)
            return
        if self.closed:
            raise RuntimeError("this DevicePicker is closed; create a new one to connect")
        with self._connect_lock:
            if self._connecting:
                self._status("a request is already waiting; cancel it first", error=True)
                return
            self._connecting = True
            cancel = self._owned.cancel = threading.Event()
            self._owned.threads[:] = [t for t in self._owned.threads if t.is_alive()]
            thread = threading.Thread(target=self._connect_worker, args=(key, cancel), daemon=True,
                                      name=f"DevicePicker connect {key}")
            self._owned.threads.append(thread)
        if view is not None:
            view.set_connecting(True)
        self._status(f"asking {self.tracker_address} for a {key!r} device…")
        thread.start()

    def cancel(self) -> None:
        """Withdraw the request waiting in the tracker's queue (as the Cancel button)."""
        cancel = self._owned.cancel
        if cancel is not None and self._connecting and not cancel.is_set():
            cancel.set()
            self._status("cancelling…")

    def close(self) -> None:
        """Stop polling, cancel a waiting request, join the threads and close the widgets. Idempotent."""
        self._finalizer()

    # -- display --------------------------------------------------------------------------
    def _repr_mimebundle_(self, include: Any = None, exclude: Any = None) -> dict[str, Any]:
        view = self._owned.view
        if view is None or view.closed:
            return {"text/plain": repr(self), "text/html": self._repr_html_()}
        bundle = dict(view.root._repr_mimebundle_() or {})
        bundle["text/plain"] = repr(self)
        bundle["text/html"] = self._static_html()  # for viewers without the widget manager; no tracker I/O
        return bundle

    def _repr_html_(self) -> str:
        """A static HTML summary (polled now when no background thread keeps one)."""
        if self._owned.view is None and not self.closed:
            try:
                self.poll_once()
            except RPCError:
                pass
        return self._static_html()

    def _static_html(self) -> str:
        title = f"<b>Tracker {html.escape(self.tracker_address)}</b>"
        parts = [title]
        if self.error:
            parts.append(f'<div style="{_ERROR_STYLE}">{html.escape(self.error)}</div>')
        if self.summary is not None:
            parts.append(self.summary._repr_html_())
        elif not self.error:
            parts.append(f'<div style="{_MUTED_STYLE}">no summary yet</div>')
        return "\n".join(parts)

    def __repr__(self) -> str:
        state = "closed" if self.closed else ("unreachable" if self.error else "live")
        session = f" session {self.session.address}" if self.session is not None else ""
        return f"<DevicePicker tracker {self.tracker_address} {state}{session}>"

    # -- polling --------------------------------------------------------------------------
    def _address(self) -> tuple[str, int]:
        if self._addr is None:
            from ..farm import default_tracker

            self._addr = default_tracker()  # may start the embedded farm: done on the polling thread
        return self._addr

    def _poll(self) -> TrackerSummary:
        from ..rpc.client.tracker_session import TrackerSession

        owned = self._owned
        with owned.lock:
            if owned.stop.is_set():
                raise RuntimeError("this DevicePicker is closed")
            addr = self._address()
            try:
                if owned.tracker is None:
                    owned.tracker = TrackerSession(addr, timeout=POLL_IO_TIMEOUT_S)
                raw = owned.tracker.summary()
            except BaseException:
                owned.drop_tracker()  # the next poll connects afresh (the tracker may come back on its port)
                raise
            summary = raw if isinstance(raw, TrackerSummary) else TrackerSummary(raw)
            self.summary, self.error, self._updated = summary, None, time.time()
            if owned.view is not None:
                owned.view.show_summary(summary, self.tracker_address)
            return summary

    def _tick(self) -> float:
        """One poll of the background thread; returns the seconds until the next."""
        try:
            self._poll()
        except Exception as exc:
            if self.closed:
                return self.interval
            if not isinstance(exc, (OSError, RPCError)):
                log.exception("DevicePicker: polling %s failed", self.tracker_address)
            self._failures += 1
            delay = min(self.interval * 2 ** self._failures, self.backoff_max)
            self._show_unreachable(exc, delay)
            return delay
        self._failures = 0
        return self.interval

    def _show_unreachable(self, exc: BaseException, retry_in: float | None) -> None:
        reason = _short(exc) if isinstance(exc, (OSError, RPCError)) else f"{type(exc).__name__}: {_short(exc)}"
        detail = f"unreachable ({reason})"
        if retry_in is not None:
            detail += f"; retrying in {retry_in:.0f} s" if retry_in >= 1 else f"; retrying in {retry_in:.1f} s"
        if self.summary is not None and self._updated is not None:
            detail += time.strftime("; the tables are from %H:%M:%S", time.localtime(self._updated))
        self.error = f"tracker {self.tracker_address} {detail}"
        log.info("%s", self.error)
        view = self._owned.view
        if view is not None:
            view.show_error(self.tracker_address, detail)

    # -- connecting -----------------------------------------------------------------------
    def _connect_worker(self, key: str, cancel: threading.Event) -> None:
        try:
            session = self._open(key, cancel)
        except Exception as exc:
            from ..farm import RequestCancelled

            if isinstance(exc, RequestCancelled) or cancel.is_set():
                self._status(f"request for a {key!r} device cancelled")
            else:
                log.info("DevicePicker: no %r device: %s", key, exc)
                self._status(f"could not connect to a {key!r} device: {_short(exc, 300)}", error=True)
            return
        finally:
            self._connecting = False
            view = self._owned.view
            if view is not None:
                view.set_connecting(False)
        if cancel.is_set():  # cancelled (or closed) just as the grant came: free the device
            session.close()
            self._status(f"request for a {key!r} device cancelled")
            return
        self.session = session
        where = self._bind(session)
        self._status(f"connected to {session.address}{where}")
        if self.on_connect is not None:
            try:
                self.on_connect(session)
            except Exception as exc:
                log.exception("DevicePicker: on_connect failed")
                self._status(f"connected to {session.address}{where}; on_connect failed: {_short(exc)}",
                             error=True)

    def _open(self, key: str, cancel: threading.Event) -> "RPCSession":
        import inspect

        from ..farm import open_session

        options: dict[str, Any] = {}
        if "progress" in inspect.signature(open_session).parameters:
            options["progress"] = False  # the status line shows the wait
        return open_session(key=key, tracker=self._addr, priority=self.priority, on_wait=self._on_wait,
                            cancel=cancel, **options)

    def _on_wait(self, status: Any) -> None:
        cancel = self._owned.cancel
        if cancel is None or not cancel.is_set():  # keep "cancelling…" once Cancel was pressed
            self._status(describe_wait(status))

    def _bind(self, session: "RPCSession") -> str:
        if self.namespace is not None:
            self.namespace[self.name] = session
            return f" as `{self.name}`"
        shell = _ipython_shell()
        if shell is not None:
            shell.user_ns[self.name] = session
            return f" as `{self.name}`"
        return " (picker.session)"

    # -- widget callbacks (held weakly by the widgets) -----------------------------------
    def _on_connect_clicked(self, _button: Any = None) -> None:
        self.connect()

    def _on_cancel_clicked(self, _button: Any = None) -> None:
        self.cancel()

    def _on_root_comm(self, change: Any) -> None:
        if change.get("new") is None and not self.closed:  # the panel was closed (picker.widget.close())
            self.close()

    def _status(self, text: str, *, error: bool = False) -> None:
        log.debug("DevicePicker: %s", text)
        view = self._owned.view
        if view is not None:
            view.show_status(text, error=error)


class _PickerView:
    """The widgets of a picker: one HTML widget per table row, keyed by device key / server address."""

    def __init__(self, widgets: Any, picker: DevicePicker):
        self.w = widgets
        self.closed = False
        self.header = widgets.HTML(value=self._title(picker.tracker_address, "connecting…"))
        self.key_head = widgets.HTML(value=_row_html(KEY_CELLS, [c[0] for c in KEY_CELLS], head=True))
        self.server_head = widgets.HTML(value=_row_html(SERVER_CELLS, [c[0] for c in SERVER_CELLS], head=True))
        self.no_keys = widgets.HTML(value=f'<div style="{_MUTED_STYLE};padding:1px 6px">no device keys</div>')
        self.no_servers = widgets.HTML(value=f'<div style="{_MUTED_STYLE};padding:1px 6px">no servers registered</div>')
        self.keys_box = widgets.VBox([self.key_head, self.no_keys])
        self.servers_box = widgets.VBox([self.server_head, self.no_servers])
        self.key_rows: dict[str, Any] = {}
        self.server_rows: dict[str, Any] = {}
        self.key_select = widgets.Dropdown(options=[], description="device key")
        self.connect_button = widgets.Button(description="Connect", button_style="primary", disabled=True,
                                             tooltip=f"get a device of this key and bind it to `{picker.name}`")
        self.cancel_button = widgets.Button(description="Cancel", button_style="warning",
                                            tooltip="withdraw the request from the tracker's queue",
                                            layout=widgets.Layout(display="none"))
        self.status = widgets.HTML(value="")
        self.connecting = False
        self._buttons = threading.RLock()  # the polling thread and Connect both set the buttons
        self.connect_button.on_click(_weak_callback(picker._on_connect_clicked))
        self.cancel_button.on_click(_weak_callback(picker._on_cancel_clicked))
        self.root = widgets.VBox([
            self.header,
            widgets.HTML(value="<b>Queues</b>"), self.keys_box,
            widgets.HTML(value="<b>Servers</b>"), self.servers_box,
            widgets.HBox([self.key_select, self.connect_button, self.cancel_button]),
            self.status,
        ])
        self.root.observe(_weak_callback(picker._on_root_comm), names="comm")

    @staticmethod
    def _title(address: str, detail: str, *, error: bool = False) -> str:
        style = _ERROR_STYLE if error else _MUTED_STYLE
        return f'<b>Tracker {html.escape(address)}</b> <span style="{style}">{html.escape(detail)}</span>'

    # -- updates (from the polling thread, under the picker's lock) ------------------------
    def show_summary(self, summary: TrackerSummary, address: str) -> None:
        key_rows, server_rows = summary.key_rows(), summary.server_rows()
        self._sync(self.keys_box, self.key_head, self.no_keys, self.key_rows,
                   [(row["key"], key_row_html(row)) for row in key_rows])
        self._sync(self.servers_box, self.server_head, self.no_servers, self.server_rows,
                   list(zip(_server_ids(server_rows), map(server_row_html, server_rows))))
        detail = f"· {len(server_rows)} server(s), {len(key_rows)} key(s)"
        self._set(self.header, self._title(address, detail))
        self._set_keys(tuple(row["key"] for row in key_rows))

    def show_error(self, address: str, detail: str) -> None:
        self._set(self.header, self._title(address, detail, error=True))

    def _sync(self, box: Any, head: Any, empty: Any, widgets_by_id: dict[str, Any],
              rows: list[tuple[str, str]]) -> None:
        """Set each row widget's value only if it changed; add and remove row widgets as rows come and go."""
        current: dict[str, Any] = {}
        for ident, value in rows:
            widget = widgets_by_id.get(ident)
            if widget is None:
                widget = self.w.HTML(value=value)
            else:
                self._set(widget, value)
            current[ident] = widget
        children = (head, *current.values()) if current else (head, empty)
        if tuple(box.children) != children:
            box.children = children
        for ident, widget in widgets_by_id.items():
            if ident not in current:
                widget.close()
        widgets_by_id.clear()
        widgets_by_id.update(current)

    @staticmethod
    def _set(widget: Any, value: str) -> None:
        if widget.value != value:
            widget.value = value

    def _set_keys(self, keys: tuple[str, ...]) -> None:
        select = self.key_select
        if tuple(select.options) != keys:
            chosen = select.value
            select.options = keys
            if chosen in keys:
                select.value = chosen
            elif keys:
                select.value = keys[0]
        self._update_buttons()

    # -- connect state (from any thread) ---------------------------------------------------
    def selected_key(self) -> str | None:
        return self.key_select.value

    def set_connecting(self, connecting: bool) -> None:
        with self._buttons:
            self.connecting = connecting
            self.cancel_button.layout.display = None if connecting else "none"
            self._update_buttons()

    def _update_buttons(self) -> None:
        with self._buttons:
            disabled = self.connecting or not self.key_select.options
            if self.connect_button.disabled != disabled:
                self.connect_button.disabled = disabled

    def show_status(self, text: str, *, error: bool = False) -> None:
        style = _ERROR_STYLE if error else "color:inherit"
        self._set(self.status, f'<span style="{style}">{html.escape(text)}</span>')

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        _close_tree(self.root)
        for widget in (*self.key_rows.values(), *self.server_rows.values(), self.no_keys, self.no_servers):
            _close_tree(widget)


def _close_tree(widget: Any) -> None:
    """Close a widget, its children and its layout/style models."""
    for child in tuple(getattr(widget, "children", ()) or ()):
        _close_tree(child)
    for name in ("layout", "style"):
        sub = getattr(widget, name, None)
        if sub is not None and hasattr(sub, "close"):
            sub.close()
    widget.close()
