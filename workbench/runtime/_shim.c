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
 * The module itself holds the client's fast paths: exchange(), for requests without a bulk part
 * (workbench/rpc/wire/protocol.py, SocketChannel.request): the request sent and the first bytes of its
 * reply received in one call from Python, the reply decoded here when it came whole; and Caller and
 * FunctionBase, which make RemoteFunction(*args) one C call (encoding included, see below).  A shim
 * built before them lacks them; the client then keeps its pure-Python paths.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>

#include <errno.h>
#include <limits.h>
#include <stdint.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/types.h>
#include <sys/uio.h>

#include "kernel_runtime.h"
#include "wire_out.h"

enum {
  SMALL_REQUEST = 64 << 10, /* up to this size, the first send is tried without releasing the GIL */
};

/* Whether buf[:got] is exactly one whole frame without a bulk part. */
static int is_whole_reply(const unsigned char *buf, Py_ssize_t got) {
  return got >= HEADER_SIZE && get_le(buf + 8, 8) == 0 && get_le(buf, 4) == (uint64_t)(got - HEADER_SIZE);
}

/* The control part of the whole reply at buf[:got], decoded (nil without a call: the most common reply). */
static PyObject *reply_ctrl(const unsigned char *buf, Py_ssize_t got, PyObject *unpack) {
  if (got == HEADER_SIZE + 1 && buf[HEADER_SIZE] == 0xC0) return Py_NewRef(Py_None);
  PyObject *data = PyBytes_FromStringAndSize((const char *)buf + HEADER_SIZE, got - HEADER_SIZE);
  if (data == NULL) return NULL;
  PyObject *ctrl = PyObject_CallOneArg(unpack, data);
  Py_DECREF(data);
  return ctrl;
}

/*
 * The reply at buf[:got] as the tuple (kind, flags, ctrl, 0) when it is exactly one whole frame without
 * a bulk part, its control part decoded by unpack(bytes) (nil without a call: the most common reply);
 * Py_None (a marker, not a new reference) when it is anything else, for the caller's buffered reader.
 */
static PyObject *whole_reply(const unsigned char *buf, Py_ssize_t got, PyObject *unpack) {
  if (!is_whole_reply(buf, got)) return Py_None;
  PyObject *ctrl = reply_ctrl(buf, got, unpack);
  if (ctrl == NULL) return NULL;
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

/* What is left of the frame (header, then control part) from byte `sent` on, sent once; errno as send's. */
static ssize_t send_rest(int fd, unsigned char *head, const Py_buffer *ctrl, Py_ssize_t sent, int flags) {
  if (head + HEADER_SIZE == (unsigned char *)ctrl->buf) /* one piece of memory (the call fast path's frame) */
    return send(fd, head + sent, (size_t)(HEADER_SIZE + ctrl->len - sent), flags | MSG_NOSIGNAL);
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
 * The send and the receive of exchange(), for callers that checked their arguments: `head` is the
 * frame's header, `ctrl` its control part, `buf` the receive buffer.  Returns what exchange() returns
 * (a new reference), or NULL with an exception set; with `received`, a reply is never decoded: the
 * bytes received are returned as a number and stored there.
 */
static PyObject *exchange_io(int fd, unsigned char *head, const Py_buffer *ctrl, const Py_buffer *buf,
                             PyObject *unpack, Py_ssize_t *received) {
  const Py_ssize_t total = HEADER_SIZE + ctrl->len;
  Py_ssize_t sent = 0;
  ssize_t n;
  int err = 0;

  /* Sending.  A small request fits the socket's buffer: one non-blocking send, the GIL kept (no wait). */
  if (total <= SMALL_REQUEST) {
    n = send_rest(fd, head, ctrl, 0, MSG_DONTWAIT);
    if (n >= 0)
      sent = n;
    else if (errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR)
      return PyErr_SetFromErrno(PyExc_OSError);
  }
  while (sent < total) { /* the rest as sendall sends it: waiting without the GIL, signals checked each time */
    Py_BEGIN_ALLOW_THREADS
    n = send_rest(fd, head, ctrl, sent, 0);
    err = n < 0 ? errno : 0;
    Py_END_ALLOW_THREADS
    if (n >= 0)
      sent += n;
    else if (err == EAGAIN || err == EWOULDBLOCK) /* a non-blocking socket: the caller waits with its timeout */
      return PyLong_FromSsize_t(-1 - sent);
    else if (err != EINTR) {
      errno = err;
      return PyErr_SetFromErrno(PyExc_OSError);
    }
    if (received != NULL && sent == total) *received = -2; /* all sent: an interrupt from here consumed nothing */
    if (PyErr_CheckSignals() < 0) return NULL;
  }
  if (received != NULL) *received = -2;
  if (PyErr_CheckSignals() < 0) return NULL; /* as sendall does after its last send: Ctrl-C during it raises now */

  /* Receiving: what one recv() brings. */
  for (;;) {
    Py_BEGIN_ALLOW_THREADS
    n = recv(fd, buf->buf, (size_t)buf->len, 0);
    err = n < 0 ? errno : 0;
    Py_END_ALLOW_THREADS
    if (n >= 0) break;
    if (err == EAGAIN || err == EWOULDBLOCK) return PyLong_FromSsize_t(-1 - sent);
    if (err != EINTR) {
      errno = err;
      return PyErr_SetFromErrno(PyExc_OSError);
    }
    if (PyErr_CheckSignals() < 0) return NULL; /* interrupted: the handlers run; one that raises ends the call */
  }
  if (received != NULL) { /* the caller decodes the reply */
    *received = n;
    return PyLong_FromSsize_t(n);
  }
  PyObject *result = whole_reply(buf->buf, n, unpack);
  return result == Py_None ? PyLong_FromSsize_t(n) : result;
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
  PyObject *result = exchange_io((int)fd, head, &ctrl, &buf, args[4], NULL);
  PyBuffer_Release(&ctrl);
  PyBuffer_Release(&buf);
  return result;
}

/*
 * The call fast path: RemoteFunction(*args) in one C call (workbench/rpc/client/session.py).
 *
 * FunctionBase is RemoteFunction's base: it holds the function's `session` and `_wb_handle`, and
 * calling it encodes the CALL request here (msgpack, bit for bit as msgpack-python packs it), takes
 * the session's lock, sends it and receives the reply as exchange() does.  A session that can take
 * this path has a Caller in its `_fast` attribute: the socket's descriptor, the channel and its
 * receive buffer, the session's lock and its list of pending frees.  Python closes the Caller as it
 * closes the channel, under the lock, so a closed descriptor (perhaps reused) is never written to.
 *
 * Everything this path does not finish is done in Python, as before:
 *   - before anything is sent (no Caller, an argument that is not a plain value nor this session's
 *     tensor, module or function, handles waiting to be freed, bytes left in the channel's buffer):
 *     RemoteFunction._call_python(args);
 *   - after the request went out, unless one whole reply that is not an error came back:
 *     session._resume_call(got, frame) with the lock still held, where `got` is what exchange()
 *     returned or the exception it raised, and `frame` the request's bytes.
 */
static PyObject *str_fast, *str_acquire, *str_release, *str_busy, *str_awaiting, *str_start, *str_end, *str_call_python,
    *str_resume_call, *str_session, *str_wb_handle, *str_wrap_result; /* interned names, set by PyInit__shim */

enum { STACK_FRAME = 4096 }; /* a request encoded here fits this; a bigger one takes the Python path */

static int out_handle(Out *o, PyObject *handle, PyObject *handle_type) {
  /* a Handle is msgpack.ExtType(code, 8 bytes): fixext 8 */
  if (Py_TYPE(handle) != (PyTypeObject *)handle_type || PyTuple_GET_SIZE(handle) != 2) return -1;
  PyObject *code = PyTuple_GET_ITEM(handle, 0), *data = PyTuple_GET_ITEM(handle, 1);
  if (!PyLong_Check(code) || !PyBytes_CheckExact(data) || PyBytes_GET_SIZE(data) != 8) return -1;
  long c = PyLong_AsLong(code);
  if (c < 0 || c > 127) {
    PyErr_Clear();
    return -1;
  }
  if (out_tag(o, 0xD7, (uint64_t)c, 1) < 0) return -1;
  return out_put(o, PyBytes_AS_STRING(data), 8);
}

/*
 * One argument of a call from `session`: a plain value (exact None, bool, int, float, str, bytes) or
 * this session's tensor, module or function (its handle).  -1 with no exception set for anything
 * else, or when the frame is full: the Python path then sends it, or says why it cannot.
 */
static int out_arg(Out *o, PyObject *v, PyObject *session, PyObject *handle_type) {
  int plain = out_plain(o, v);
  if (plain <= 0) return plain;
  /* a tensor, module or function: encoded when it is this session's (the Python path says why not) */
  PyObject *owner = PyObject_GetAttr(v, str_session);
  if (owner == NULL) {
    PyErr_Clear();
    return -1;
  }
  Py_DECREF(owner); /* compared by identity only */
  if (owner != session) return -1;
  PyObject *handle = PyObject_GetAttr(v, str_wb_handle);
  if (handle == NULL) {
    PyErr_Clear();
    return -1;
  }
  int rc = out_handle(o, handle, handle_type);
  Py_DECREF(handle);
  return rc;
}

typedef struct {
  PyObject_HEAD
  int fd;
  int open;        /* cleared by close(): the fast path is never taken again */
  Py_buffer buf;   /* the channel's receive buffer, exported while open */
  PyObject *chan;  /* the SocketChannel: its busy flag and buffered bytes */
  PyObject *lock;  /* the session's RLock */
  PyObject *acquire, *release; /* its bound methods (looked up once) */
  PyObject *pending; /* the session's list of handles to free */
  PyObject *unpack;
  PyObject *handle_type;
} CallerObject;

static PyTypeObject CallerType;

static int caller_init(CallerObject *self, PyObject *args, PyObject *kwargs) {
  static char *names[] = {"fd", "chan", "buffer", "lock", "pending", "unpack", "handle_type", NULL};
  int fd;
  PyObject *chan, *buffer, *lock, *pending, *unpack, *handle_type;
  if (self->open) {
    PyErr_SetString(PyExc_RuntimeError, "Caller.__init__ called twice");
    return -1;
  }
  if (!PyArg_ParseTupleAndKeywords(args, kwargs, "iOOOO!OO!:Caller", names, &fd, &chan, &buffer, &lock,
                                   &PyList_Type, &pending, &unpack, &PyType_Type, &handle_type))
    return -1;
  if (fd < 0) {
    PyErr_SetString(PyExc_ValueError, "Caller: the socket is closed (fd -1)");
    return -1;
  }
  PyObject *acquire = PyObject_GetAttr(lock, str_acquire);
  PyObject *release = acquire ? PyObject_GetAttr(lock, str_release) : NULL;
  if (release == NULL || PyObject_GetBuffer(buffer, &self->buf, PyBUF_WRITABLE) < 0) {
    Py_XDECREF(acquire);
    Py_XDECREF(release);
    return -1;
  }
  Py_XSETREF(self->acquire, acquire);
  Py_XSETREF(self->release, release);
  self->fd = fd;
  self->chan = Py_NewRef(chan);
  self->lock = Py_NewRef(lock);
  self->pending = Py_NewRef(pending);
  self->unpack = Py_NewRef(unpack);
  self->handle_type = Py_NewRef(handle_type);
  self->open = 1;
  return 0;
}

static PyObject *caller_close(CallerObject *self, PyObject *unused) {
  (void)unused;
  if (self->open) {
    self->open = 0;
    PyBuffer_Release(&self->buf);
  }
  Py_RETURN_NONE;
}

static void caller_dealloc(CallerObject *self) {
  if (self->open) PyBuffer_Release(&self->buf);
  Py_XDECREF(self->chan);
  Py_XDECREF(self->lock);
  Py_XDECREF(self->acquire);
  Py_XDECREF(self->release);
  Py_XDECREF(self->pending);
  Py_XDECREF(self->unpack);
  Py_XDECREF(self->handle_type);
  Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *caller_get_open(CallerObject *self, void *unused) {
  (void)unused;
  return PyBool_FromLong(self->open);
}

static PyMethodDef caller_methods[] = {
    {"close", (PyCFunction)caller_close, METH_NOARGS, "close(): never take the fast path again (the channel is closing)"},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef caller_getset[] = {
    {"open", (getter)caller_get_open, NULL, "whether calls may take the fast path", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject CallerType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "workbench.runtime._shim.Caller",
    .tp_basicsize = sizeof(CallerObject),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Caller(fd, chan, buffer, lock, pending, unpack, handle_type): a session's call fast path",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)caller_init,
    .tp_dealloc = (destructor)caller_dealloc,
    .tp_methods = caller_methods,
    .tp_getset = caller_getset,
};

typedef struct {
  PyObject_HEAD
  PyObject *session;
  PyObject *handle;
} FunctionObject;


/* release(), the lock's bound method, keeping the exception being raised (if any); -1 if the release itself failed. */
/* Whether the channel's receive buffer holds no bytes (chan._start == chan._end); -1 on error. */
static int buffer_empty(PyObject *chan) {
  PyObject *start = PyObject_GetAttr(chan, str_start);
  if (start == NULL) return -1;
  PyObject *end = PyObject_GetAttr(chan, str_end);
  if (end == NULL) {
    Py_DECREF(start);
    return -1;
  }
  int same = PyObject_RichCompareBool(start, end, Py_EQ);
  Py_DECREF(start);
  Py_DECREF(end);
  return same;
}

static PyObject *function_call(FunctionObject *self, PyObject *args, PyObject *kwargs) {
  if (kwargs != NULL && PyDict_GET_SIZE(kwargs)) {
    PyErr_SetString(PyExc_TypeError, "a remote function takes positional arguments only");
    return NULL;
  }
  PyObject *session = self->session, *handle = self->handle;
  if (session == NULL || handle == NULL) goto python;
  PyObject *fast = PyObject_GetAttr(session, str_fast);
  if (fast == NULL) {
    PyErr_Clear();
    goto python;
  }
  Py_DECREF(fast); /* the session holds it; it holds what is used below */
  if (Py_TYPE(fast) != &CallerType || !((CallerObject *)fast)->open) goto python;
  CallerObject *caller = (CallerObject *)fast;

  /* [handle, args] after the header */
  unsigned char frame[STACK_FRAME];
  Out o = {frame, HEADER_SIZE, sizeof frame};
  Py_ssize_t nargs = PyTuple_GET_SIZE(args);
  if (out_tag(&o, 0x92, 0, 0) < 0 || out_handle(&o, handle, caller->handle_type) < 0 ||
      out_sized(&o, (size_t)nargs, 0x90, 16, 0, 0xDC, 0xDD) < 0)
    goto python;
  for (Py_ssize_t i = 0; i < nargs; i++)
    if (out_arg(&o, PyTuple_GET_ITEM(args, i), session, caller->handle_type) < 0) goto python;
  put_header(frame, (uint32_t)(o.len - HEADER_SIZE), 25 /* Kind.CALL */);

  Py_INCREF(caller); /* kept while the lock is waited for (the session may drop it meanwhile) */
  PyObject *got = PyObject_CallNoArgs(caller->acquire);
  if (got == NULL) {
    Py_DECREF(caller);
    return NULL; /* interrupted while waiting: nothing was sent */
  }
  Py_DECREF(got);
  int ready = caller->open && PyList_GET_SIZE(caller->pending) == 0 ? buffer_empty(caller->chan) : 0;
  if (ready <= 0) {
    int failed = ready < 0;
    if (release_lock(caller->release) < 0) failed = 1;
    Py_DECREF(caller);
    if (failed) return NULL;
    goto python;
  }
  /* The channel's busy flag (a request on the wire) matters only to the Python code that handles a
   * failure, and no other Python code uses the channel meanwhile (the lock): it is set on the way there. */
  Py_buffer ctrl = {.buf = frame + HEADER_SIZE, .len = (Py_ssize_t)(o.len - HEADER_SIZE)};
  Py_ssize_t n = -1;
  got = exchange_io(caller->fd, frame, &ctrl, &caller->buf, caller->unpack, &n);
  const unsigned char *reply = caller->buf.buf;
  PyObject *result = NULL;
  int fast_reply = 0; /* the result came from the reply here, not from _resume_call (which wraps its own) */
  if (got != NULL && n > 0 && is_whole_reply(reply, n) && get_le(reply + 4, 2) != 1 /* Kind.ERROR */) {
    Py_DECREF(got);
    result = reply_ctrl(reply, n, caller->unpack);
    got = NULL; /* a control part that does not decode goes the Python way, as an exception */
    fast_reply = result != NULL;
  }
  if (result == NULL) { /* the rest in Python, the lock still held: a reply in pieces, an error, a lost connection */
    int interrupted = got == NULL && n == -2;
    if (got == NULL) {
      PyObject *type, *value, *tb;
      PyErr_Fetch(&type, &value, &tb);
      PyErr_NormalizeException(&type, &value, &tb);
      if (tb != NULL) PyException_SetTraceback(value, tb);
      Py_XDECREF(type);
      Py_XDECREF(tb);
      got = value;
    }
    PyObject *sent = PyBytes_FromStringAndSize((const char *)frame, (Py_ssize_t)o.len);
    /* interrupted: the request went out whole and nothing of the reply was read when the exception came
       (Ctrl-C): the channel is `awaiting`, so the session can send CANCEL and go on */
    if (got != NULL && sent != NULL && PyObject_SetAttr(caller->chan, str_busy, Py_True) == 0 &&
        (!interrupted || PyObject_SetAttr(caller->chan, str_awaiting, Py_True) == 0))
      result = PyObject_CallMethodObjArgs(session, str_resume_call, got, sent, NULL);
    Py_XDECREF(got);
    Py_XDECREF(sent);
  }
  if (release_lock(caller->release) < 0) Py_CLEAR(result);
  Py_DECREF(caller);
  if (fast_reply && result != NULL && !PyLong_CheckExact(result) && !PyFloat_CheckExact(result) &&
      result != Py_None && !PyUnicode_CheckExact(result) && !PyBool_Check(result) && !PyBytes_CheckExact(result)) {
    /* a tensor or a function (a closure) the call returned, maybe in a list: made usable in Python */
    PyObject *wrapped = PyObject_CallMethodOneArg(session, str_wrap_result, result);
    Py_DECREF(result);
    result = wrapped;
  }
  return result;

python:
  return PyObject_CallMethodOneArg((PyObject *)self, str_call_python, args);
}

static int function_traverse(FunctionObject *self, visitproc visit, void *arg) {
  Py_VISIT(self->session);
  Py_VISIT(self->handle);
  return 0;
}

static int function_clear(FunctionObject *self) {
  Py_CLEAR(self->session);
  Py_CLEAR(self->handle);
  return 0;
}

static void function_dealloc(FunctionObject *self) {
  PyObject_GC_UnTrack(self);
  function_clear(self);
  Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyMemberDef function_members[] = {
    {"session", T_OBJECT_EX, offsetof(FunctionObject, session), 0, "the session the function lives in"},
    {"_wb_handle", T_OBJECT_EX, offsetof(FunctionObject, handle), 0, "the function's handle in that session"},
    {NULL, 0, 0, 0, NULL},
};

static PyTypeObject FunctionType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "workbench.runtime._shim.FunctionBase",
    .tp_basicsize = sizeof(FunctionObject),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "RemoteFunction's base: calling it takes the call fast path (see _shim.c)",
    .tp_new = PyType_GenericNew,
    .tp_call = (ternaryfunc)function_call,
    .tp_traverse = (traverseproc)function_traverse,
    .tp_clear = (inquiry)function_clear,
    .tp_dealloc = (destructor)function_dealloc,
    .tp_members = function_members,
};

/* scrub_secrets(secrets: list[bytes]) -> int: wb_scrub_secrets over them (copies wiped, -1 on failure) */
static PyObject* shim_scrub_secrets(PyObject* self, PyObject* arg) {
  (void)self;
  if (!PyList_Check(arg) || PyList_GET_SIZE(arg) > 8) {
    PyErr_SetString(PyExc_TypeError, "scrub_secrets takes a list of at most 8 bytes objects");
    return NULL;
  }
  const char* secrets[8];
  int64_t lengths[8];
  Py_ssize_t n = PyList_GET_SIZE(arg);
  for (Py_ssize_t i = 0; i < n; ++i) {
    PyObject* item = PyList_GET_ITEM(arg, i);
    if (!PyBytes_Check(item)) {
      PyErr_SetString(PyExc_TypeError, "scrub_secrets takes bytes objects");
      return NULL;
    }
    secrets[i] = PyBytes_AS_STRING(item);
    lengths[i] = (int64_t)PyBytes_GET_SIZE(item);
  }
  return PyLong_FromLongLong((long long)wb_scrub_secrets(secrets, lengths, (int32_t)n));
}

/* guard_secrets(drop_ptrace: bool) -> int: wb_guard_secrets */
static PyObject* shim_guard_secrets(PyObject* self, PyObject* arg) {
  (void)self;
  int drop = PyObject_IsTrue(arg);
  if (drop < 0) return NULL;
  return PyLong_FromLong(wb_guard_secrets(drop));
}

static PyMethodDef shim_methods[] = {
    {"scrub_secrets", (PyCFunction)shim_scrub_secrets, METH_O,
     "scrub_secrets(secrets) -> int: wipe every copy of these bytes from this process's writable memory"},
    {"guard_secrets", (PyCFunction)shim_guard_secrets, METH_O,
     "guard_secrets(drop_ptrace) -> int: not dumpable; drop_ptrace: no CAP_SYS_PTRACE either (a worker)"},
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

PyMODINIT_FUNC PyInit__shim(void) {
  static struct {
    PyObject **name;
    const char *text;
  } names[] = {{&str_fast, "_fast"}, {&str_acquire, "acquire"}, {&str_release, "release"}, {&str_busy, "busy"}, {&str_awaiting, "awaiting"},
               {&str_start, "_start"}, {&str_end, "_end"}, {&str_call_python, "_call_python"},
               {&str_resume_call, "_resume_call"}, {&str_session, "session"}, {&str_wb_handle, "_wb_handle"},
               {&str_wrap_result, "_wrap_result"}};
  for (size_t i = 0; i < sizeof names / sizeof names[0]; i++)
    if (*names[i].name == NULL && (*names[i].name = PyUnicode_InternFromString(names[i].text)) == NULL) return NULL;
  if (PyType_Ready(&CallerType) < 0 || PyType_Ready(&FunctionType) < 0) return NULL;
  PyObject *module = PyModule_Create(&shim_module);
  if (module == NULL) return NULL;
  if (PyModule_AddObjectRef(module, "Caller", (PyObject *)&CallerType) < 0 ||
      PyModule_AddObjectRef(module, "FunctionBase", (PyObject *)&FunctionType) < 0) {
    Py_DECREF(module);
    return NULL;
  }
  return module;
}
