"""upstream: tests/python/support/test_ccache.py (apache-tvm 0.27): test_shared and test_executable, on workbench.cc.

TVM's ``create_shared`` and ``create_executable`` take ``cwd`` (where the compiler runs: relative sources and
output are there) and ``ccache_env`` (run the compiler through ccache with these variables; without ccache
installed, a ValueError), and so do ours.
"""
from __future__ import annotations

import os
import shutil

import pytest

from workbench import cc

CREATORS = [pytest.param(cc.create_shared, "main.o", id="create_shared"),
            pytest.param(cc.create_executable, "main", id="create_executable")]


def src_gen(text: str) -> str:
    return '#include <iostream>\n\nint main() {\n    std::cout << "%s";\n    return 0;\n}\n' % text


def compile_in(temp_dir, f_create, text: str, output: str, ccache_env=None) -> None:
    with open(os.path.join(temp_dir, "src.cpp"), "w", encoding="utf-8") as file:
        file.write(src_gen(text))
    f_create(output, ["src.cpp"], ["-c"], cwd=str(temp_dir), ccache_env=ccache_env)


@pytest.mark.skipif(shutil.which("ccache") is None, reason="ccache is not installed: apt-get install ccache")
@pytest.mark.parametrize("f_create, output", CREATORS)
def test_ccache(f_create, output, tmp_path):
    """upstream: test_ccache.py::test_shared and ::test_executable — the same source compiled twice (``-c``, in
    ``cwd``) through ccache (``ccache_env``): the second compile is a cache hit in ccache's log."""
    logs = []
    for run in ("first", "second"):
        temp_dir = tmp_path / run
        temp_dir.mkdir()
        log_path = temp_dir / "log.txt"
        compile_in(temp_dir, f_create, "shared" if output == "main.o" else "executable", output,
                   {"CCACHE_COMPILERCHECK": "content", "CCACHE_LOGFILE": str(log_path)})
        logs.append(log_path.read_text(encoding="utf-8"))
    assert "Succeeded getting cached result" in logs[1]


@pytest.mark.parametrize("f_create, output", CREATORS)
def test_ccache_call_without_ccache(f_create, output, tmp_path):
    """upstream: test_ccache.py::test_shared and ::test_executable — the call they make, where ccache need not be
    installed: relative source and output are in ``cwd``; ``ccache_env`` without ccache is a ValueError."""
    compile_in(tmp_path, f_create, "hello", output)
    with open(tmp_path / output, "rb") as f:
        assert f.read(4) == b"\x7fELF"
    if shutil.which("ccache") is None:
        with pytest.raises(ValueError, match="ccache"):
            compile_in(tmp_path, f_create, "hello", output, {"CCACHE_COMPILERCHECK": "content"})
