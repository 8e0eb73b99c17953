"""msgpack length boundaries through every encoder and decoder on the wire (issue 17, item 8).

Each format switches at a length: fixarray/array16 at 16 elements, fixmap/map16 at 16 entries,
fixstr/str8/str16 at 32 and 256 bytes, bin8/bin16/bin32 at 256 and 65536 bytes. A one-line slip
in any encoder or decoder (the client's C fast path, its plain path, the Python server, minrpc)
shows only at those lengths, so every one is crossed here, both ways: calls with that many
arguments, strings and bytes of those lengths, and replies with that many elements
(``time_evaluator`` repeats, ``listdir`` entries, ``workbench.echo``).
"""
from __future__ import annotations

import pytest

from workbench import cc, rpc
from .helpers import start_server

KERNELS = r"""
#include <string.h>
#include <workbench_kernel.h>

typedef struct { const char* data; size_t size; } ByteArray;

/* nargs * 1000000 + the sum of the int arguments: how many came, and that each came whole */
WB_KERNEL(count_and_sum) {
  int64_t sum = 0;
  for (int i = 0; i < nargs; ++i) {
    if (args[i].type_index != kTVMFFIInt) WB_FAIL("TypeError", "count_and_sum takes ints");
    sum += args[i].v_int64;
  }
  WB_RETURN_INT((int64_t)nargs * 1000000 + sum);
}

/* the length of a str argument, checked to be the pattern 'a'..'z' repeated */
WB_KERNEL(str_len) {
  WB_EXPECT_ARGS(1);
  if (args[0].type_index != kTVMFFIRawStr) WB_FAIL("TypeError", "str_len takes a str");
  const char* s = args[0].v_c_str;
  size_t n = strlen(s);
  for (size_t i = 0; i < n; ++i)
    if (s[i] != 'a' + (char)(i % 26)) WB_FAIL("ValueError", "str_len: the string came changed");
  WB_RETURN_INT((int64_t)n);
}

/* the length of a bytes argument, checked to be the pattern i % 251 */
WB_KERNEL(bytes_len) {
  WB_EXPECT_ARGS(1);
  if (args[0].type_index != kTVMFFIByteArrayPtr) WB_FAIL("TypeError", "bytes_len takes bytes");
  const ByteArray* b = (const ByteArray*)args[0].v_ptr;
  for (size_t i = 0; i < b->size; ++i)
    if ((unsigned char)b->data[i] != i % 251) WB_FAIL("ValueError", "bytes_len: the bytes came changed");
  WB_RETURN_INT((int64_t)b->size);
}
"""

ARRAY_LENGTHS = [15, 16, 17, 255, 256, 257]
STR_LENGTHS = [31, 32, 33, 255, 256, 257, 65535, 65536, 65537]
BIN_LENGTHS = [255, 256, 257, 65535, 65536, 65537]


@pytest.fixture(scope="module")
def boundary_so(tmp_path_factory):
    out = tmp_path_factory.mktemp("boundaries")
    (out / "boundaries.c").write_text(KERNELS)
    return cc.create_shared(out / "boundaries.so", [str(out / "boundaries.c")])


@pytest.fixture(scope="module", params=["python", "minrpc"])
def any_server(request, tmp_path_factory):
    srv = start_server(request.param)
    yield srv
    srv.terminate()


@pytest.fixture(params=["fast path", "plain path"])
def session(request, any_server, boundary_so):
    """A session whose calls take the client's C fast path, or its plain Python path (logging on)."""
    remote = rpc.connect("127.0.0.1", any_server.port, enable_logging=request.param == "plain path")
    assert (remote._fast is not None) == (request.param == "fast path")
    remote.upload(boundary_so)
    yield remote, remote.load_module("boundaries.so")
    remote.close()


def _text(n: int) -> str:
    return "".join(chr(ord("a") + i % 26) for i in range(n))


def _bytes(n: int) -> bytes:
    return bytes(i % 251 for i in range(n))


@pytest.mark.parametrize("n", ARRAY_LENGTHS)
def test_calls_with_n_arguments(session, n):
    _, mod = session
    assert mod["count_and_sum"](*range(n)) == n * 1000000 + n * (n - 1) // 2


@pytest.mark.parametrize("n", STR_LENGTHS)
def test_str_arguments_of_n_bytes(session, n):
    _, mod = session
    assert mod["str_len"](_text(n)) == n


@pytest.mark.parametrize("n", BIN_LENGTHS)
def test_bytes_arguments_of_n_bytes(session, n):
    _, mod = session
    assert mod["bytes_len"](bytearray(_bytes(n))) == n


@pytest.mark.parametrize("n", ARRAY_LENGTHS)
def test_replies_with_n_elements(session, n):
    remote, mod = session
    timing = mod.time_evaluator("count_and_sum", remote.cpu(), number=1, repeat=n)(1, 2)
    assert len(timing.results) == n
    names = [f"f{i:03d}" for i in range(n)]
    for name in names:
        remote.upload(b"", target=name)
    assert sorted(remote.listdir(".")) == sorted(names + ["boundaries.so"])
    echoed = remote.get_function("workbench.echo")(*range(n))
    assert list(echoed) == list(range(n))


@pytest.mark.parametrize("n", STR_LENGTHS[:6] + BIN_LENGTHS[3:])
def test_echoed_strings_and_bytes_of_n_bytes(session, n):
    remote, _ = session
    echo = remote.get_function("workbench.echo")
    assert echo(_text(n)) == _text(n)  # one argument comes back as itself
    assert bytes(echo(bytearray(_bytes(n)))) == _bytes(n)
    assert echo(_text(n), 1) == [_text(n), 1]


@pytest.mark.parametrize("n", [15, 16, 17])
def test_maps_of_n_entries_in_a_python_server_reply(n, private_tmpdir):
    """Maps cross the wire in handshakes and replies; the Python server's functions may return one of any size."""
    with rpc.Server(port=0, silent=True, server_init_callback="tests.helpers:register_extras") as srv, \
            rpc.connect("127.0.0.1", srv.port) as remote:
        assert remote.get_function("tests.dict_of")(n) == {f"k{i}": i for i in range(n)}
