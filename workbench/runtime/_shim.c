/*
 * The kernel-ABI shim: the Python server's native piece, a CPython extension.
 *
 * Everything kernels see is in ../native/kernel_runtime.c (shared with minrpc, the native server): the
 * error setter kernels call, the last error per thread, the timing loop behind time_evaluator, and
 * what TVM's runtime gives kernels through context slots (thread pool, workspaces, runtime functions
 * looked up by name, stubs for the ones it lacks).  The extension is built from this file and that
 * one (setup.py; ffi.py's _build_shim for a tree copied without pip install), so that pip compiles
 * the runtime with the package.  Python loads it RTLD_GLOBAL before any kernel and calls it through
 * ctypes (workbench/runtime/ffi.py).
 *
 * The module itself holds one function, exchange(), the client's fast path for requests without a
 * bulk part (workbench/rpc/protocol.py, SocketChannel.request): the request sent and the first bytes
 * of its reply received in one call from Python, the reply decoded here when it came whole.  A shim
 * built before it lacks the function; the client then keeps its pure-Python path.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <errno.h>
#include <limits.h>
#include <stdint.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/types.h>
#include <sys/uio.h>

#include "kernel_runtime.h"

/* The 16-byte frame header of docs/protocol.md, little-endian: u32 ctrl_len, u16 kind, u16 flags, u64 bulk_len. */
enum {
  HEADER_SIZE = 16,
  SMALL_REQUEST = 64 << 10, /* up to this size, the first send is tried without releasing the GIL */
};

static void put_header(unsigned char *head, uint32_t ctrl_len, uint16_t kind) {
  memset(head, 0, HEADER_SIZE); /* flags and bulk_len 0: a request without a bulk part, wanting a reply */
  for (int i = 0; i < 4; i++) head[i] = (unsigned char)(ctrl_len >> (8 * i));
  head[4] = (unsigned char)(kind & 0xFF);
  head[5] = (unsigned char)(kind >> 8);
}

static uint64_t get_le(const unsigned char *p, int bytes) {
  uint64_t v = 0;
  for (int i = bytes - 1; i >= 0; i--) v = (v << 8) | p[i];
  return v;
}

/*
 * The reply at buf[:got] as the tuple (kind, flags, ctrl, 0) when it is exactly one whole frame without
 * a bulk part, its control part decoded by unpack(bytes) (nil without a call: the most common reply);
 * Py_None (a marker, not a new reference) when it is anything else, for the caller's buffered reader.
 */
static PyObject *whole_reply(const unsigned char *buf, Py_ssize_t got, PyObject *unpack) {
  if (got < HEADER_SIZE) return Py_None;
  uint64_t ctrl_len = get_le(buf, 4), bulk_len = get_le(buf + 8, 8);
  if (bulk_len != 0 || ctrl_len != (uint64_t)(got - HEADER_SIZE)) return Py_None;
  PyObject *ctrl;
  if (ctrl_len == 1 && buf[HEADER_SIZE] == 0xC0) {
    ctrl = Py_NewRef(Py_None);
  } else {
    PyObject *data = PyBytes_FromStringAndSize((const char *)buf + HEADER_SIZE, (Py_ssize_t)ctrl_len);
    if (data == NULL) return NULL;
    ctrl = PyObject_CallOneArg(unpack, data);
    Py_DECREF(data);
    if (ctrl == NULL) return NULL;
  }
  PyObject *frame = PyTuple_New(4);
  PyObject *reply_kind = PyLong_FromUnsignedLong((unsigned long)get_le(buf + 4, 2));
  PyObject *flags = PyLong_FromUnsignedLong((unsigned long)get_le(buf + 6, 2));
  PyObject *zero = PyLong_FromLong(0);
  if (frame == NULL || reply_kind == NULL || flags == NULL || zero == NULL) {
    Py_XDECREF(frame);
    Py_XDECREF(reply_kind);
    Py_XDECREF(flags);
    Py_XDECREF(zero);
    Py_DECREF(ctrl);
    return NULL;
  }
  PyTuple_SET_ITEM(frame, 0, reply_kind);
  PyTuple_SET_ITEM(frame, 1, flags);
  PyTuple_SET_ITEM(frame, 2, ctrl);
  PyTuple_SET_ITEM(frame, 3, zero);
  return frame;
}

/* sendmsg() of what is left of the frame (header, then control part) from byte `sent` on; errno as sendmsg's. */
static ssize_t send_rest(int fd, unsigned char *head, const Py_buffer *ctrl, Py_ssize_t sent, int flags) {
  struct iovec iov[2];
  struct msghdr msg;
  memset(&msg, 0, sizeof msg);
  msg.msg_iov = iov;
  if (sent < HEADER_SIZE) {
    iov[0].iov_base = head + sent;
    iov[0].iov_len = (size_t)(HEADER_SIZE - sent);
    iov[1].iov_base = ctrl->buf;
    iov[1].iov_len = (size_t)ctrl->len;
    msg.msg_iovlen = ctrl->len ? 2 : 1;
  } else {
    iov[0].iov_base = (char *)ctrl->buf + (sent - HEADER_SIZE);
    iov[0].iov_len = (size_t)(ctrl->len - (sent - HEADER_SIZE));
    msg.msg_iovlen = 1;
  }
  return sendmsg(fd, &msg, flags | MSG_NOSIGNAL);
}

/*
 * exchange(fd, kind, ctrl, buffer, unpack) -> tuple or int
 *
 * The client's fast path for a request without a bulk part: sends one frame of kind `kind` with the
 * control part `ctrl` (bytes-like, already msgpack), flags 0 and no bulk part on the connected socket
 * `fd`, then receives once into the writable `buffer` (what one recv() brings, at most len(buffer)
 * bytes).  Returns:
 *
 *   a tuple      the whole request went out and exactly one whole reply without a bulk part came
 *                back: (kind, flags, unpack(control part), 0); nothing of it stays for the reader;
 *   n > 0        the whole request went out and n bytes of the reply are at buffer[:n], for the
 *                buffered reader (a partial reply, one with a bulk part, or more than one frame);
 *   0            the whole request went out and the peer closed the connection (end of stream);
 *   -1 - sent    the socket would block (it is non-blocking: a Python socket with a timeout) after
 *                `sent` bytes of the frame (header included): the caller sends the rest, if any, and
 *                receives through the socket object, which waits with the socket's timeout.
 *
 * It behaves as socket.sendall() then socket.recv_into() on a blocking socket: system errors raise
 * OSError from errno (BrokenPipeError, ConnectionResetError, EBADF for a closed socket's fd -1, ...);
 * the Python signal handlers run after each send and whenever a system call is interrupted (EINTR),
 * and if one raises (KeyboardInterrupt on Ctrl-C) so does this call, else the call goes on where it
 * stopped.  The GIL is released while the call waits: a send that cannot complete at once, and the
 * receive.  An error of unpack is raised as it is.
 */
static PyObject *shim_exchange(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
  (void)self;
  if (nargs != 5) {
    PyErr_Format(PyExc_TypeError, "exchange(fd, kind, ctrl, buffer, unpack) takes 5 arguments (%zd given)", nargs);
    return NULL;
  }
  long fd = PyLong_AsLong(args[0]);
  if (fd == -1 && PyErr_Occurred()) return NULL;
  long kind = PyLong_AsLong(args[1]);
  if (kind == -1 && PyErr_Occurred()) return NULL;
  if (kind < 0 || kind > 0xFFFF) {
    PyErr_Format(PyExc_OverflowError, "frame kind %ld is not a u16", kind);
    return NULL;
  }
  if (fd < 0 || fd > INT_MAX) { /* a closed socket's fileno() is -1 */
    errno = EBADF;
    return PyErr_SetFromErrno(PyExc_OSError);
  }
  Py_buffer ctrl, buf;
  if (PyObject_GetBuffer(args[2], &ctrl, PyBUF_SIMPLE) < 0) return NULL;
  if ((unsigned long long)ctrl.len > 0xFFFFFFFFull) {
    PyBuffer_Release(&ctrl);
    PyErr_SetString(PyExc_OverflowError, "a control part over 4 GiB does not fit a frame header");
    return NULL;
  }
  if (PyObject_GetBuffer(args[3], &buf, PyBUF_WRITABLE) < 0) {
    PyBuffer_Release(&ctrl);
    return NULL;
  }
  /* Both buffers stay exported (not resizable) while the GIL is released. */
  unsigned char head[HEADER_SIZE];
  put_header(head, (uint32_t)ctrl.len, (uint16_t)kind);
  const Py_ssize_t total = HEADER_SIZE + ctrl.len;
  PyObject *result = NULL;
  Py_ssize_t sent = 0;
  ssize_t n;
  int err = 0;

  /* Sending.  A small request fits the socket's buffer: one non-blocking send, the GIL kept (no wait). */
  if (total <= SMALL_REQUEST) {
    n = send_rest((int)fd, head, &ctrl, 0, MSG_DONTWAIT);
    if (n >= 0)
      sent = n;
    else if (errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR)
      goto os_error;
  }
  while (sent < total) { /* the rest as sendall sends it: waiting without the GIL, signals checked each time */
    Py_BEGIN_ALLOW_THREADS
    n = send_rest((int)fd, head, &ctrl, sent, 0);
    err = n < 0 ? errno : 0;
    Py_END_ALLOW_THREADS
    if (n >= 0)
      sent += n;
    else if (err == EAGAIN || err == EWOULDBLOCK) /* a non-blocking socket: the caller waits with its timeout */
      goto would_block;
    else if (err != EINTR) {
      errno = err;
      goto os_error;
    }
    if (PyErr_CheckSignals() < 0) goto done;
  }
  if (PyErr_CheckSignals() < 0) goto done; /* as sendall does after its last send: Ctrl-C during it raises now */

  /* Receiving: what one recv() brings. */
  for (;;) {
    Py_BEGIN_ALLOW_THREADS
    n = recv((int)fd, buf.buf, (size_t)buf.len, 0);
    err = n < 0 ? errno : 0;
    Py_END_ALLOW_THREADS
    if (n >= 0) break;
    if (err == EAGAIN || err == EWOULDBLOCK) goto would_block;
    if (err != EINTR) {
      errno = err;
      goto os_error;
    }
    if (PyErr_CheckSignals() < 0) goto done; /* interrupted: the handlers run; one that raises ends the call */
  }
  result = whole_reply(buf.buf, n, args[4]);
  if (result == Py_None) result = PyLong_FromSsize_t(n);
  goto done;

would_block:
  result = PyLong_FromSsize_t(-1 - sent);
  goto done;
os_error:
  PyErr_SetFromErrno(PyExc_OSError);
done:
  PyBuffer_Release(&ctrl);
  PyBuffer_Release(&buf);
  return result;
}

static PyMethodDef shim_methods[] = {
    {"exchange", (PyCFunction)(void (*)(void))shim_exchange, METH_FASTCALL,
     "exchange(fd, kind, ctrl, buffer, unpack) -> tuple or int: send a request, receive its reply (the client's fast path)"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef shim_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "_shim",
    .m_doc = "rpc-workbench kernel-ABI shim (used through ctypes) and the RPC client's fast path",
    .m_size = -1,
    .m_methods = shim_methods,
};

PyMODINIT_FUNC PyInit__shim(void) { return PyModule_Create(&shim_module); }
