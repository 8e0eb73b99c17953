"""Memory reused between transfers (issue "Performance, round 3"): never visible to the program.

The server keeps the memory of released tensors for the next tensor of the same size that a transfer
fills entirely (``storage.SPARE``); the client receives downloads and ``Tensor.numpy()`` into buffers
the program dropped (``buffers.RECYCLER``). Both must hand out memory nobody can still see, and a tensor
asked for without data must still read as zeros.
"""
from __future__ import annotations

import gc

import numpy as np
import pytest

from workbench import rpc, runtime
from workbench.errors import BadRequestError
from workbench.runtime.buffers import Recycler
from workbench.runtime.storage import Memory, SpareMemory

MIB = 1 << 20


@pytest.fixture(scope="module")
def remote(private_tmpdir):
    with rpc.Server(port=0, silent=True) as server:
        session = rpc.connect("127.0.0.1", server.port)
        yield session
        session.close()


def test_a_tensor_asked_for_without_data_reads_as_zeros_after_a_freed_one_of_its_size(remote):
    dev = remote.cpu(0)
    for _ in range(3):
        full = runtime.tensor(np.full(MIB, 7, dtype="int32"), dev)
        del full
        gc.collect()  # the free rides on the next request, before the allocation
        empty = runtime.empty((MIB,), "int32", dev)
        assert not empty.numpy().any()
        del empty


def test_tensors_made_from_data_hold_their_own_data_while_memory_is_reused(remote):
    dev = remote.cpu(0)
    rng = np.random.default_rng(1)
    arrays = [rng.integers(0, 1 << 30, 3 * MIB // 4, dtype="int32") for _ in range(6)]
    kept = []
    for i, arr in enumerate(arrays):
        tensor = runtime.tensor(arr, dev)
        if i % 2:
            kept.append((arr, tensor))  # alive: its memory is never handed to another tensor
        del tensor
    for arr, tensor in kept:
        np.testing.assert_array_equal(tensor.numpy(), arr)


def test_numpy_results_the_program_holds_are_never_overwritten(remote):
    dev = remote.cpu(0)
    tensor = runtime.tensor(np.zeros(2 * MIB, dtype="uint8"), dev)
    first = tensor.numpy()
    tensor.copyfrom(np.ones(2 * MIB, dtype="uint8"))
    second = tensor.numpy()
    view = memoryview(second)[:16]
    del second
    tensor.copyfrom(np.full(2 * MIB, 2, dtype="uint8"))
    third = tensor.numpy()
    assert not first.any() and bytes(view) == b"\x01" * 16 and (third == 2).all()
    del first, view
    tensor.copyfrom(np.full(2 * MIB, 3, dtype="uint8"))
    assert (tensor.numpy() == 3).all()
    assert (third == 2).all()


def test_downloads_the_program_holds_are_never_overwritten(remote):
    remote.upload(b"a" * (2 * MIB), "a.bin")
    remote.upload(b"b" * (2 * MIB), "b.bin")
    a = remote.download("a.bin")
    b = remote.download("b.bin")
    assert a == b"a" * (2 * MIB) and b == b"b" * (2 * MIB)
    del a
    again = remote.download("b.bin")
    assert again == b and b == b"b" * (2 * MIB)


def test_the_recycler_reuses_only_what_nothing_references():
    recycler = Recycler(limit=8 * MIB, min_bytes=MIB)
    buf = recycler.get(2 * MIB)
    first = id(buf)
    array = np.frombuffer(buf, dtype="uint8")
    del buf
    other = recycler.get(2 * MIB)
    assert id(other) != first  # the array still sees the first buffer
    del array, other
    assert id(recycler.get(2 * MIB)) == first
    assert len(recycler.get(512)) == 512  # small ones are plain buffers
    held = [recycler.get(3 * MIB) for _ in range(4)]  # more than the limit: the oldest are forgotten
    assert sum(len(b) for b in recycler._out) <= 8 * MIB and len(held) == 4


def test_spare_memory_keeps_only_memory_nothing_views():
    spare = SpareMemory(limit=4 * MIB, min_bytes=MIB)
    viewed = Memory(2 * MIB)
    view = memoryview(viewed.map)
    assert not spare.keep(viewed)
    view.release()
    assert spare.keep(viewed) and spare.take(2 * MIB) is viewed
    assert spare.take(2 * MIB) is None
    assert not spare.keep(Memory(4096))  # small: not worth keeping
    for _ in range(3):
        assert spare.keep(Memory(2 * MIB))
    assert spare.bytes <= 4 * MIB


def test_a_large_tensor_made_from_data_reads_back_and_takes_writes(remote):
    dev = remote.cpu(0)
    data = np.random.default_rng(2).integers(0, 255, 3 * MIB + 5, dtype="uint8")  # not a whole page
    tensor = runtime.tensor(data, dev)
    np.testing.assert_array_equal(tensor.numpy(), data)
    again = data[::-1].copy()
    tensor.copyfrom(again)
    np.testing.assert_array_equal(tensor.numpy(), again)
    with pytest.raises(ValueError):
        tensor.copyfrom(np.zeros(7, dtype="uint8"))
    np.testing.assert_array_equal(tensor.numpy(), again)


def test_a_write_of_the_wrong_size_into_a_large_tensor_is_refused_and_changes_nothing(remote):
    data = np.arange(MIB // 2, dtype="float32")  # 2 MiB: in huge pages
    tensor = runtime.tensor(data, remote.cpu(0))
    for size in (8, 3 * MIB):
        with pytest.raises(BadRequestError, match=f"expected {2 * MIB} bytes of data, the request carries {size}"):
            remote._request(27, [tensor._wb_handle], bulk=memoryview(b"\1" * size))  # TENSOR_WRITE
    np.testing.assert_array_equal(tensor.numpy(), data)
    assert remote.ping()["tensors"] >= 1  # the session is in step


def test_large_numpy_results_of_a_local_session_and_a_remote_one_are_the_tensor(remote):
    data = np.random.default_rng(3).random(MIB, dtype="float32")  # 4 MiB: received into huge pages remotely
    with rpc.LocalSession() as local:
        for session in (local, remote):
            tensor = runtime.tensor(data, session.cpu(0))
            first = tensor.numpy()
            second = tensor.numpy()
            assert first is not second and first.flags.writeable
            first[:] = 0  # the program's own array: the tensor and the other result keep their values
            np.testing.assert_array_equal(second, data)
            np.testing.assert_array_equal(tensor.numpy(), data)
