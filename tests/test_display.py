"""Rich display in notebooks: sessions, modules and farms render as HTML tables with what a user looks for."""
from __future__ import annotations

from workbench.farm import LocalFarm


def test_session_html_shows_address_devices_and_workspace(remote, server):
    remote.upload(b"hello", target="notes.txt")
    html = remote._repr_html_()
    assert f"127.0.0.1:{server.port}" in html and "cpu(0)" in html and "notes.txt" in html
    assert remote.info["target"] in html
    remote.close()
    closed = remote._repr_html_()
    assert "ended" in closed and "notes.txt" not in closed  # no request to a closed session
    assert "closed" in repr(remote)


def test_module_html_lists_functions(mod):
    html = mod._repr_html_()
    assert "kernels.so" in html and all(name in html for name in mod.function_names)


def test_farm_html_shows_its_queues_and_servers(private_tmpdir):
    with LocalFarm({"board<1>": 2}) as farm:
        html = farm._repr_html_()
        assert "board&lt;1&gt;" in html and "<b>board<1>" not in html  # escaped
        assert html.count(f"127.0.0.1:{farm.servers[0].port}") == 1
        summary = farm.summary()
        assert summary.keys_frame().set_index("key").loc["board<1>", "total"] == 2
        with farm.request("board<1>") as remote:
            assert "board&lt;1&gt;" in remote._repr_html_() and "key='board<1>'" in repr(remote)
    assert "stopped" in farm._repr_html_()
