"""The server's tokens are out of a kernel's reach (issue 17, item 1; workbench/rpc/server/secrets.py).

A real kernel, run by a real server that holds an auth token and a registration token, searches
everywhere a kernel can look: its process's environment block (/proc/self/environ), its whole memory
(/proc/self/mem, every readable mapping), and its parent's environment and memory (/proc/PPID/environ,
/proc/PPID/mem). It finds neither token, and cannot even open its parent's memory (the server is not
dumpable, the worker has no CAP_SYS_PTRACE: this holds as root too). The kernel is given
each token reversed, so that the argument itself is no copy to find.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from workbench import cc, rpc

from .conftest import wait_until

AUTH = "auth-token-3f9c1d2e7a6b5c4d"
REGISTRATION = "registration-token-8e7d6c5b4a39"

SEARCH = r"""
#define _GNU_SOURCE
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <workbench_kernel.h>

static char pattern[256];
static size_t pattern_len;

/* copies of the pattern in `n` bytes read from address `from` into `data` (the kernel's own pattern left out) */
static int count(const char* data, size_t n, unsigned long from) {
  int found = 0;
  for (const char* p = data; (p = memmem(p, n - (size_t)(p - data), pattern, pattern_len)) != NULL; p += pattern_len)
    if (from + (unsigned long)(p - data) != (unsigned long)pattern) ++found;
  return found;
}

static int search_file(const char* path) {  /* -1: cannot be opened */
  int fd = open(path, O_RDONLY);
  if (fd < 0) return -1;
  size_t cap = 1 << 20, n = 0;
  char* buf = malloc(cap);
  ssize_t got;
  while ((got = read(fd, buf + n, cap - n)) > 0) n += (size_t)got;
  close(fd);
  int found = count(buf, n, 0);
  free(buf);
  return found;
}

static int search_memory(int pid) {  /* every readable mapping through /proc/PID/mem; -1: cannot be opened */
  char path[64];
  snprintf(path, sizeof path, "/proc/%d/maps", pid);
  FILE* maps = fopen(path, "r");
  snprintf(path, sizeof path, "/proc/%d/mem", pid);
  int mem = open(path, O_RDONLY);
  if (!maps || mem < 0) {
    if (maps) fclose(maps);
    if (mem >= 0) close(mem);
    return -1;
  }
  int found = 0;
  char line[512];
  char* buf = malloc(1 << 20);
  while (fgets(line, sizeof line, maps)) {
    unsigned long lo, hi;
    char perms[5];
    if (sscanf(line, "%lx-%lx %4s", &lo, &hi, perms) != 3 || perms[0] != 'r' || strstr(line, "[vvar]")) continue;
    if (hi - lo > (1ul << 30)) continue;
    for (unsigned long at = lo; at < hi; at += (1 << 20) - 256) {
      size_t want = hi - at < (1 << 20) ? hi - at : (1 << 20);
      ssize_t got = pread(mem, buf, want, (off_t)at);
      if (got > 0) found += count(buf, (size_t)got, at);
      if ((size_t)got < want) break;
    }
  }
  free(buf);
  fclose(maps);
  close(mem);
  return found;
}

/* search(reversed_token, where) -> copies found; where: 0 self environ, 1 self memory, 2 parent environ,
   3 parent memory (-1: cannot be opened) */
WB_KERNEL(search) {
  WB_EXPECT_ARGS(2);
  if (args[0].type_index != kTVMFFIRawStr) WB_FAIL("TypeError", "search takes the reversed token as a str");
  const char* reversed = args[0].v_c_str;
  pattern_len = strlen(reversed);
  for (size_t i = 0; i < pattern_len; ++i) pattern[i] = reversed[pattern_len - 1 - i];
  char path[64];
  int found;
  switch (WB_ARG_INT(1)) {
  case 0: found = search_file("/proc/self/environ"); break;
  case 1: found = search_memory(getpid()); break;
  case 2: snprintf(path, sizeof path, "/proc/%d/environ", getppid()); found = search_file(path); break;
  default: found = search_memory(getppid()); break;
  }
  memset(pattern, 0, sizeof pattern);
  WB_RETURN_INT(found);
}
"""

WHERE = {0: "/proc/self/environ", 1: "its own memory", 2: "/proc/PPID/environ", 3: "/proc/PPID/mem"}


@pytest.fixture(scope="module")
def search_so(tmp_path_factory):
    out = tmp_path_factory.mktemp("search")
    (out / "search.c").write_text(SEARCH)
    return cc.create_shared(out / "search.so", [str(out / "search.c")])


def _found(remote: rpc.RPCSession, search_so) -> dict[str, int]:
    remote.upload(search_so)
    search = remote.load_module("search.so")["search"]
    return {f"{name} in {WHERE[where]}": search(token[::-1], where)
            for name, token in (("auth", AUTH), ("registration", REGISTRATION)) for where in WHERE}


def _assert_hidden(found: dict[str, int]) -> None:
    assert all(n <= 0 for n in found.values()), f"a kernel found the server's tokens: {found}"
    parent_memory = [n for what, n in found.items() if "PPID/mem" in what]
    assert all(n == -1 for n in parent_memory), f"the kernel could open its parent's memory: {found}"


@pytest.mark.parametrize("no_fork", [False, True], ids=["forked-worker", "spawned-worker"])
def test_a_kernel_finds_no_token_in_a_python_server(search_so, private_tmpdir, monkeypatch, no_fork):
    monkeypatch.setenv("WORKBENCH_RPC_TOKEN", AUTH)  # as a user would start it: in the environment too
    monkeypatch.setenv("WORKBENCH_REGISTRATION_TOKEN", REGISTRATION)
    with rpc.Server(port=0, silent=True, no_fork=no_fork) as srv, \
            rpc.connect("127.0.0.1", srv.port, auth_token=AUTH) as remote:
        _assert_hidden(_found(remote, search_so))


def test_a_kernel_finds_no_token_in_minrpc(search_so, private_tmpdir):
    with rpc.MinRPCServer(port=0, auth_token=AUTH, registration_token=REGISTRATION) as srv, \
            rpc.connect("127.0.0.1", srv.port, auth_token=AUTH) as remote:
        _assert_hidden(_found(remote, search_so))


def test_a_kernel_finds_no_token_in_the_command_line_server(search_so, private_tmpdir, tmp_path):
    """``python -m workbench.exec.rpc_server`` serves in the process that read the tokens from its environment."""
    env = dict(os.environ, WORKBENCH_RPC_TOKEN=AUTH, WORKBENCH_REGISTRATION_TOKEN=REGISTRATION,
               TMPDIR=private_tmpdir)
    log = tmp_path / "server.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "workbench.exec.rpc_server", "--port", "0", "--port-end", "0"],
                                env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        assert wait_until(lambda: _bound_port(log), timeout=30), log.read_text()
        port = _bound_port(log)
        with rpc.connect("127.0.0.1", port, auth_token=AUTH) as remote:
            _assert_hidden(_found(remote, search_so))
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def _bound_port(log) -> int | None:
    match = re.search(r"bind to [\d.]+:(\d+)", log.read_text())
    return int(match.group(1)) if match else None
