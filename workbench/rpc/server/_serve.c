/*
 * The session worker's fast path, a CPython extension: CALL requests served in C.
 *
 * serve_requests (worker.py) asks a Server object for its next request.  Server.next_request()
 * receives into the channel's own buffer (SocketChannel._buf, between _start and _end, the way
 * Channel.recv_frame reads it) and serves, without returning to Python, every request that is
 *
 *     a CALL frame without flags or a bulk part, whose control part is [function handle, [arguments]]
 *     with a live function of the session (a callable in SessionHandler._objects) and arguments that
 *     are nil, booleans, ints, floats, strings, bytes or handles of the session's live tensors,
 *
 * while no device needs a sync after a call (device_api.SYNC is empty), and whose function returns
 * nil, a boolean, an int of at most 64 bits, a float, a string or bytes of a small size.  It calls the
 * function with the decoded arguments and sends the OK reply, encoded as msgpack-python encodes it,
 * under the session's send lock.  Everything else goes to Python, unchanged:
 *
 *   - any other frame (another kind, flags such as NO_REPLY, a bulk part, a CANCEL, a frame that came in
 *     pieces, anything that does not decode here): next_request() returns chan.recv_frame(), the frame
 *     as the Python path reads it, errors included;
 *   - a call that raised, or whose result is not one of the above (a tensor, a closure, a list...), or
 *     after which a device needs a sync: next_request() returns (CALL, flags, CallOutcome(fn, result,
 *     exc), 0), and SessionHandler.handle finishes it as SessionHandler.call would have (errors, results
 *     handed out as handles, the sync).
 *
 * The idle counter (activity[0]: odd while waiting for a request) and the busy byte of the worker's
 * page (busy[1]) change exactly as serve_requests changes them, once per request whichever side serves
 * it.  `calling` is true while a function runs here, for the watcher that stops a cancelled Python
 * function (worker.PythonCallWatch).  The GIL is released whenever the worker waits (for a request, or
 * for a send that cannot complete at once); Python's signal handlers run when a wait is interrupted.
 *
 * A socket with a timeout (non-blocking underneath) is not served here: worker.fast_server says so.
 */
#define _GNU_SOURCE /* sched_getcpu */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <errno.h>
#include <stdint.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/types.h>
#include <sched.h>
#include <time.h>

#include "wire_out.h"

enum {
  KIND_OK = 0,
  KIND_CALL = 25,
  EXT_TENSOR = 1,
  EXT_FUNCTION = 3,
  MAX_ARGS = 64,              /* a call with more arguments takes the Python path */
  REPLY_BYTES = 64 << 10,     /* a reply larger than this is sent by the Python path */
};

static PyObject *str_buf, *str_start, *str_end, *str_recv_frame, *str_acquire, *str_release, *str_locked; /* interned */

static uint64_t get_be(const unsigned char *p, int bytes) {
  uint64_t v = 0;
  for (int i = 0; i < bytes; i++) v = (v << 8) | p[i];
  return v;
}

/* -- decoding a CALL's control part ------------------------------------------------------------ */

typedef struct {
  const unsigned char *p, *end;
} In;

/* The length of a str/bin/array item whose tag is followed by `bytes` big-endian length bytes; -1: truncated. */
static Py_ssize_t in_len(In *in, int bytes) {
  if (in->end - in->p < bytes) return -1;
  Py_ssize_t n = (Py_ssize_t)get_be(in->p, bytes);
  in->p += bytes;
  return n;
}

/* The 8 id bytes of a fixext 8 handle of type `ext` at in->p (tag included), as a new bytes object:
 * the key of SessionHandler._objects.  NULL (no exception) if the item is not one. */
static PyObject *in_handle_key(In *in, int ext) {
  if (in->end - in->p < 10 || in->p[0] != 0xD7 || in->p[1] != ext) return NULL;
  PyObject *key = PyBytes_FromStringAndSize((const char *)in->p + 2, 8);
  if (key == NULL) PyErr_Clear();
  in->p += 10;
  return key;
}

typedef struct {
  PyObject_HEAD
  int fd;
  int calling;          /* a function runs on the fast path */
  long spin_us;         /* how long to poll for the next request before blocking (0: never) */
  PyObject *chan;       /* the SocketChannel: its buffer and read positions, its recv_frame */
  PyObject *objects;    /* SessionHandler._objects: handle id bytes -> object */
  PyObject *tensor_type; /* DeviceTensor */
  PyObject *sync;       /* device_api.SYNC: non-empty, calls end in Python (which syncs) */
  PyObject *lock;       /* the session's send lock */
  PyObject *acquire, *release, *locked; /* its bound methods */
  PyObject *activity;   /* IdleTimer.activity, or None */
  PyObject *busy;       /* the worker's EndReport page, or None */
  PyObject *outcome;    /* handler.CallOutcome */
  unsigned long long served; /* requests served here (for tests and benchmarks) */
  int spin_cpu, spin_ok, spin_checks; /* whether to poll, as last decided on CPU spin_cpu (spin_worthwhile) */
} ServerObject;

/* One argument (new reference), or NULL without an exception: not one the fast path passes. */
static PyObject *in_arg(In *in, ServerObject *s) {
  if (in->p >= in->end) return NULL;
  unsigned char tag = *in->p++;
  Py_ssize_t n;
  PyObject *v = NULL;
  if (tag <= 0x7F) return PyLong_FromLong(tag);
  if (tag >= 0xE0) return PyLong_FromLong((long)(signed char)tag);
  if (tag >= 0xA0 && tag <= 0xBF) {
    n = tag & 0x1F;
    goto str;
  }
  switch (tag) {
    case 0xC0:
      return Py_NewRef(Py_None);
    case 0xC2:
      return Py_NewRef(Py_False);
    case 0xC3:
      return Py_NewRef(Py_True);
    case 0xCC: case 0xCD: case 0xCE: case 0xCF: {
      int bytes = 1 << (tag - 0xCC);
      if (in->end - in->p < bytes) return NULL;
      uint64_t u = get_be(in->p, bytes);
      in->p += bytes;
      v = PyLong_FromUnsignedLongLong(u);
      break;
    }
    case 0xD0: case 0xD1: case 0xD2: case 0xD3: {
      int bytes = 1 << (tag - 0xD0);
      if (in->end - in->p < bytes) return NULL;
      uint64_t u = get_be(in->p, bytes);
      in->p += bytes;
      int64_t x = bytes == 8 ? (int64_t)u : (int64_t)(u << (64 - 8 * bytes)) >> (64 - 8 * bytes);
      v = PyLong_FromLongLong(x);
      break;
    }
    case 0xCA: {
      if (in->end - in->p < 4) return NULL;
      uint32_t bits = (uint32_t)get_be(in->p, 4);
      float f;
      memcpy(&f, &bits, 4);
      in->p += 4;
      v = PyFloat_FromDouble((double)f);
      break;
    }
    case 0xCB: {
      if (in->end - in->p < 8) return NULL;
      uint64_t bits = get_be(in->p, 8);
      double d;
      memcpy(&d, &bits, 8);
      in->p += 8;
      v = PyFloat_FromDouble(d);
      break;
    }
    case 0xD9: case 0xDA: case 0xDB:
      n = in_len(in, 1 << (tag - 0xD9));
      goto str;
    case 0xC4: case 0xC5: case 0xC6:
      n = in_len(in, 1 << (tag - 0xC4));
      if (n < 0 || in->end - in->p < n) return NULL;
      v = PyBytes_FromStringAndSize((const char *)in->p, n);
      in->p += n;
      break;
    case 0xD7: { /* a tensor handle: the live tensor it names */
      in->p--;
      PyObject *key = in_handle_key(in, EXT_TENSOR);
      if (key == NULL) return NULL;
      PyObject *obj = PyDict_GetItemWithError(s->objects, key); /* borrowed */
      Py_DECREF(key);
      if (obj == NULL) break;
      int is = PyObject_IsInstance(obj, s->tensor_type);
      if (is == 1) return Py_NewRef(obj);
      break;
    }
    default:
      return NULL;
  }
  if (v == NULL) PyErr_Clear();
  return v;
str:
  if (n < 0 || in->end - in->p < n) return NULL;
  v = PyUnicode_DecodeUTF8((const char *)in->p, n, "strict");
  in->p += n;
  if (v == NULL) PyErr_Clear(); /* not UTF-8: the Python path says so */
  return v;
}

/* The function and arguments of the CALL whose control part is ctrl[:len]: 1 (fn and args[:*nargs]
 * filled, new references), 0 if the fast path does not serve it (nothing filled, no exception). */
static int decode_call(ServerObject *s, const unsigned char *ctrl, Py_ssize_t len, PyObject **fn, PyObject **args,
                       Py_ssize_t *nargs) {
  In in = {ctrl, ctrl + len};
  if (len < 12 || *in.p++ != 0x92) return 0;
  PyObject *key = in_handle_key(&in, EXT_FUNCTION);
  if (key == NULL) return 0;
  PyObject *f = PyDict_GetItemWithError(s->objects, key); /* borrowed */
  Py_DECREF(key);
  if (f == NULL) {
    PyErr_Clear();
    return 0;
  }
  if (!PyCallable_Check(f) || in.p >= in.end) return 0;
  unsigned char tag = *in.p++;
  Py_ssize_t n;
  if ((tag & 0xF0) == 0x90)
    n = tag & 0x0F;
  else if (tag == 0xDC)
    n = in_len(&in, 2);
  else
    return 0;
  if (n < 0 || n > MAX_ARGS) return 0;
  Py_ssize_t i;
  for (i = 0; i < n; i++)
    if ((args[i] = in_arg(&in, s)) == NULL) break;
  if (i < n || in.p != in.end) { /* not all plain, or bytes left over (msgpack calls that malformed) */
    for (Py_ssize_t j = 0; j < i; j++) Py_DECREF(args[j]);
    return 0;
  }
  *fn = Py_NewRef(f);
  *nargs = n;
  return 1;
}

/* -- encoding the reply -------------------------------------------------------------------------- */

/* A plain result, encoded as msgpack-python's Packer(use_bin_type=True) encodes it; -1 (no exception) if
 * it is of another type, does not fit, or is an int over 64 bits: the Python path sends it then. */
static int out_result(Out *o, PyObject *v) {
  int plain = out_plain(o, v);
  return plain == 1 ? -1 : plain;
}

/* -- the connection ------------------------------------------------------------------------------ */

static double now_us(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return ts.tv_sec * 1e6 + ts.tv_nsec / 1e3;
}

/*
 * Whether polling for the next request can help: only when the client's packets come from another CPU
 * than the one this thread runs on (SO_INCOMING_CPU: on loopback, the sender's CPU).  On the client's
 * own CPU, polling would only take turns with it.  Looked at again when this thread moves to another
 * CPU, and every 64 waits (the client may move).  Runs without the GIL.
 */
static int spin_worthwhile(ServerObject *s) {
  if (s->spin_us <= 0) return 0;
  int cpu = sched_getcpu();
  if (cpu != s->spin_cpu || ++s->spin_checks >= 64) {
    int incoming = -1;
    socklen_t size = sizeof incoming;
#ifdef SO_INCOMING_CPU
    if (getsockopt(s->fd, SOL_SOCKET, SO_INCOMING_CPU, &incoming, &size) < 0) incoming = -1;
#endif
    s->spin_ok = cpu >= 0 && incoming >= 0 && incoming != cpu;
    s->spin_cpu = cpu;
    s->spin_checks = 0;
  }
  return s->spin_ok;
}

/*
 * Receive what comes next into buf[0:cap], waiting as long as it takes: first polling for up to
 * spin_us microseconds (a request that follows its reply closely is taken without the wake-up of a
 * sleeping thread), then blocking.  The GIL is released meanwhile.  Returns the bytes received (0: the
 * peer closed), or -1 with an exception set (an error, or a signal handler that raised); -2 when the
 * socket turned out non-blocking and nothing came (the caller lets Python wait, with its timeout).
 */
static Py_ssize_t receive(ServerObject *s, unsigned char *buf, Py_ssize_t cap) {
  for (;;) {
    ssize_t n;
    int err;
    Py_BEGIN_ALLOW_THREADS
    n = -1;
    errno = EAGAIN;
    if (spin_worthwhile(s)) {
      double until = now_us() + (double)s->spin_us;
      for (;;) {
        n = recv(s->fd, buf, (size_t)cap, MSG_DONTWAIT);
        if (n >= 0 || (errno != EAGAIN && errno != EWOULDBLOCK) || now_us() >= until) break;
        sched_yield(); /* a peer on this CPU (the client) runs first */
      }
    }
    if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) n = recv(s->fd, buf, (size_t)cap, 0);
    err = n < 0 ? errno : 0;
    Py_END_ALLOW_THREADS
    if (n >= 0) return n;
    if (err == EAGAIN || err == EWOULDBLOCK) return -2;
    if (err != EINTR) {
      errno = err;
      PyErr_SetFromErrno(PyExc_OSError);
      return -1;
    }
    if (PyErr_CheckSignals() < 0) return -1; /* interrupted: the handlers run; one that raises ends the wait */
  }
}

/* Send data[sent:len] (as socket.sendall does), waiting without the GIL; 0, or -1 with an exception set. */
static int send_rest(int fd, const unsigned char *data, size_t len, size_t sent) {
  ssize_t n;
  int err;
  while (sent < len) {
    Py_BEGIN_ALLOW_THREADS
    n = send(fd, data + sent, len - sent, MSG_NOSIGNAL);
    err = n < 0 ? errno : 0;
    Py_END_ALLOW_THREADS
    if (n >= 0)
      sent += (size_t)n;
    else if (err != EINTR)
      goto failed;
    if (PyErr_CheckSignals() < 0) return -1;
  }
  return 0;
failed:
  errno = err;
  PyErr_SetFromErrno(PyExc_OSError);
  return -1;
}

static int call_lock(PyObject *method) {
  PyObject *r = PyObject_CallNoArgs(method);
  if (r == NULL) return -1;
  Py_DECREF(r);
  return 0;
}

/* activity[0] += 1 */
static int step_activity(ServerObject *s) {
  if (s->activity == Py_None) return 0;
  PyObject *old = PyList_GET_ITEM(s->activity, 0);
  PyObject *one = PyLong_FromLong(1);
  PyObject *next = one ? PyNumber_Add(old, one) : NULL;
  Py_XDECREF(one);
  if (next == NULL) return -1;
  PyList_SET_ITEM(s->activity, 0, next);
  Py_DECREF(old);
  return 0;
}

static int set_size(PyObject *chan, PyObject *name, Py_ssize_t v) {
  PyObject *n = PyLong_FromSsize_t(v);
  if (n == NULL) return -1;
  int rc = PyObject_SetAttr(chan, name, n);
  Py_DECREF(n);
  return rc;
}

static Py_ssize_t get_size(PyObject *chan, PyObject *name) {
  PyObject *n = PyObject_GetAttr(chan, name);
  if (n == NULL) return -1;
  Py_ssize_t v = PyLong_AsSsize_t(n);
  Py_DECREF(n);
  return v;
}

/*
 * Send the reply data[:len] under the session's send lock: no other thread's frame (the watchdog's
 * notice) can come between its bytes.  The lock is taken only when it has to be: while this thread
 * holds the GIL, no other thread can take the lock or send, so a free lock and a reply that goes out
 * whole in one send without waiting (a small reply: the socket's buffer takes it) need nothing more.
 * A reply that does not, is finished with the lock held (taken at once: it was free, and the GIL was
 * never let go meanwhile).  0, or -1 with an exception set.
 */
static int send_reply(ServerObject *s, const unsigned char *data, size_t len) {
  PyObject *locked = PyObject_CallNoArgs(s->locked);
  if (locked == NULL) return -1;
  int free_now = locked == Py_False;
  Py_DECREF(locked);
  size_t sent = 0;
  if (free_now) {
    ssize_t n = send(s->fd, data, len, MSG_DONTWAIT | MSG_NOSIGNAL);
    if (n < 0 && errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR) {
      PyErr_SetFromErrno(PyExc_OSError);
      return -1;
    }
    if (n > 0) sent = (size_t)n;
    if (sent == len) return 0;
  }
  if (call_lock(s->acquire) < 0) return -1;
  if (send_rest(s->fd, data, len, sent) < 0) {
    release_lock(s->release); /* the send's error stays, unless releasing failed */
    return -1;
  }
  return call_lock(s->release);
}

/* Serve one decoded call: 1 when its reply went out, 0 when Python finishes it (*frame set: the
 * frame for serve_requests), -1 with an exception set. */
static int serve_call(ServerObject *s, PyObject *fn, PyObject **args, Py_ssize_t nargs, PyObject **frame) {
  s->calling = 1;
  PyObject *result = PyObject_Vectorcall(fn, args, (size_t)nargs, NULL);
  s->calling = 0;
  PyObject *exc = NULL;
  if (result == NULL) {
    PyObject *type, *tb;
    PyErr_Fetch(&type, &exc, &tb);
    PyErr_NormalizeException(&type, &exc, &tb);
    if (tb != NULL) PyException_SetTraceback(exc, tb);
    Py_XDECREF(type);
    Py_XDECREF(tb);
    if (exc == NULL) exc = Py_NewRef(Py_None); /* cannot happen: a NULL result sets an exception */
    if (!PyExceptionInstance_Check(exc)) {
      Py_DECREF(exc);
      PyErr_SetString(PyExc_SystemError, "a call on the fast path failed without an exception");
      return -1;
    }
  } else {
    unsigned char reply[HEADER_SIZE + REPLY_BYTES];
    Out o = {reply, HEADER_SIZE, sizeof reply};
    if (PyList_GET_SIZE(s->sync) == 0 && out_result(&o, result) == 0) {
      Py_DECREF(result);
      uint32_t len = (uint32_t)(o.len - HEADER_SIZE);
      put_header(reply, len, KIND_OK);
      if (send_reply(s, reply, o.len) < 0) return -1;
      s->served++;
      return 1;
    }
  }
  PyObject *outcome = PyObject_CallFunctionObjArgs(s->outcome, fn, result ? result : Py_None, exc ? exc : Py_None, NULL);
  Py_XDECREF(result);
  Py_XDECREF(exc);
  if (outcome == NULL) return -1;
  *frame = Py_BuildValue("(iiNi)", KIND_CALL, 0, outcome, 0);
  return *frame == NULL ? -1 : 0;
}

/*
 * next_request() -> frame
 *
 * Serve the requests the fast path serves, until one that it does not, or that it began and Python
 * finishes; return that one as serve_requests handles it (see the top of this file).  Errors reading
 * the stream raise as chan.recv_frame() raises them.
 */
static PyObject *server_next_request(ServerObject *s, PyObject *unused) {
  (void)unused;
  Py_buffer buf = {0}, page = {0};
  PyObject *frame = NULL, *bufobj = NULL;
  int have_page = 0, failed = 0;
  if (s->fd < 0) {
    PyErr_SetString(PyExc_ValueError, "this fast path is closed");
    return NULL;
  }
  if (s->busy != Py_None) {
    if (PyObject_GetBuffer(s->busy, &page, PyBUF_WRITABLE) < 0) return NULL;
    have_page = 1;
    if (page.len < 2) {
      PyBuffer_Release(&page);
      PyErr_SetString(PyExc_ValueError, "the busy page holds fewer than 2 bytes");
      return NULL;
    }
  }
  bufobj = PyObject_GetAttr(s->chan, str_buf);
  if (bufobj == NULL || PyObject_GetBuffer(bufobj, &buf, PyBUF_WRITABLE) < 0) {
    Py_XDECREF(bufobj);
    if (have_page) PyBuffer_Release(&page);
    return NULL;
  }
  unsigned char *data = buf.buf;
  Py_ssize_t start = get_size(s->chan, str_start), end = -1;
  if (start >= 0) end = get_size(s->chan, str_end);
  if (start < 0 || end < start || end > buf.len) {
    if (!PyErr_Occurred()) PyErr_SetString(PyExc_ValueError, "the channel's read positions are out of step");
    failed = 1;
    goto done;
  }
  for (;;) {
    /* waiting for a request */
    if (step_activity(s) < 0) {
      failed = 1;
      goto done;
    }
    if (have_page) ((unsigned char *)page.buf)[1] = 0;
    if (start == end) {
      start = end = 0;
      Py_ssize_t n = receive(s, data, buf.len);
      if (n == -1) {
        failed = 1;
        goto done;
      }
      if (n <= 0) goto python; /* closed, or a non-blocking socket: Python reads (and raises) as it does */
      end = n;
    }
    if (end - start < HEADER_SIZE) goto python; /* a header in pieces */
    const unsigned char *head = data + start;
    uint64_t ctrl_len = get_le(head, 4), bulk_len = get_le(head + 8, 8);
    unsigned kind = (unsigned)get_le(head + 4, 2), flags = (unsigned)get_le(head + 6, 2);
    if (kind != KIND_CALL || flags || bulk_len || ctrl_len > (uint64_t)(end - start - HEADER_SIZE)) goto python;
    PyObject *fn, *args[MAX_ARGS];
    Py_ssize_t nargs;
    if (!decode_call(s, head + HEADER_SIZE, (Py_ssize_t)ctrl_len, &fn, args, &nargs)) goto python;
    start += HEADER_SIZE + (Py_ssize_t)ctrl_len;
    /* serving it */
    int rc = step_activity(s);
    if (have_page) ((unsigned char *)page.buf)[1] = 1;
    if (rc == 0) rc = serve_call(s, fn, args, nargs, &frame);
    Py_DECREF(fn);
    for (Py_ssize_t i = 0; i < nargs; i++) Py_DECREF(args[i]);
    if (rc < 0) failed = 1;
    if (rc <= 0) goto done;
  }
python: /* the frame at `start`, as the Python path reads it */
  if (set_size(s->chan, str_start, start) < 0 || set_size(s->chan, str_end, end) < 0) {
    failed = 1;
    goto done;
  }
  PyBuffer_Release(&buf);
  Py_CLEAR(bufobj);
  frame = PyObject_CallMethodNoArgs(s->chan, str_recv_frame);
  if (frame == NULL) {
    if (have_page) PyBuffer_Release(&page);
    return NULL;
  }
  if (step_activity(s) < 0) {
    Py_CLEAR(frame);
  } else if (have_page) {
    ((unsigned char *)page.buf)[1] = 1;
  }
  if (have_page) PyBuffer_Release(&page);
  return frame;
done:
  if (!failed || !PyErr_Occurred()) {
    if (set_size(s->chan, str_start, start) < 0 || set_size(s->chan, str_end, end) < 0) Py_CLEAR(frame);
  } else { /* keep the error; the positions still go back (the stream is consumed up to `start`) */
    PyObject *type, *value, *tb;
    PyErr_Fetch(&type, &value, &tb);
    if (set_size(s->chan, str_start, start) < 0 || set_size(s->chan, str_end, end) < 0) PyErr_Clear();
    PyErr_Restore(type, value, tb);
  }
  PyBuffer_Release(&buf);
  Py_XDECREF(bufobj);
  if (have_page) PyBuffer_Release(&page);
  if (failed) {
    Py_CLEAR(frame);
    return NULL;
  }
  return frame;
}

static int server_init(ServerObject *s, PyObject *args, PyObject *kwargs) {
  static char *names[] = {"fd", "chan", "objects", "tensor_type", "sync", "lock", "activity", "busy", "outcome",
                          "spin_us", NULL};
  int fd;
  long spin_us = 0;
  PyObject *chan, *objects, *tensor_type, *sync, *lock, *activity, *busy, *outcome;
  if (s->chan != NULL) {
    PyErr_SetString(PyExc_RuntimeError, "Server.__init__ called twice");
    return -1;
  }
  if (!PyArg_ParseTupleAndKeywords(args, kwargs, "iOO!OO!OOOO|l:Server", names, &fd, &chan, &PyDict_Type, &objects,
                                   &tensor_type, &PyList_Type, &sync, &lock, &activity, &busy, &outcome, &spin_us))
    return -1;
  if (fd < 0) {
    PyErr_SetString(PyExc_ValueError, "Server: the socket is closed (fd -1)");
    return -1;
  }
  if (activity != Py_None && (!PyList_CheckExact(activity) || PyList_GET_SIZE(activity) < 1)) {
    PyErr_SetString(PyExc_TypeError, "Server: activity is a list of one int (IdleTimer.activity) or None");
    return -1;
  }
  s->fd = fd;
  s->spin_us = spin_us > 0 ? spin_us : 0;
  s->spin_cpu = -1;
  s->chan = Py_NewRef(chan);
  s->objects = Py_NewRef(objects);
  s->tensor_type = Py_NewRef(tensor_type);
  s->sync = Py_NewRef(sync);
  s->acquire = PyObject_GetAttr(lock, str_acquire);
  s->release = s->acquire ? PyObject_GetAttr(lock, str_release) : NULL;
  s->locked = s->release ? PyObject_GetAttr(lock, str_locked) : NULL;
  if (s->locked == NULL) {
    Py_CLEAR(s->acquire);
    Py_CLEAR(s->release);
  Py_CLEAR(s->locked);
    return -1;
  }
  s->lock = Py_NewRef(lock);
  s->activity = Py_NewRef(activity);
  s->busy = Py_NewRef(busy);
  s->outcome = Py_NewRef(outcome);
  return 0;
}

static int server_traverse(ServerObject *s, visitproc visit, void *arg) {
  Py_VISIT(s->chan);
  Py_VISIT(s->objects);
  Py_VISIT(s->tensor_type);
  Py_VISIT(s->sync);
  Py_VISIT(s->lock);
  Py_VISIT(s->acquire);
  Py_VISIT(s->release);
  Py_VISIT(s->locked);
  Py_VISIT(s->activity);
  Py_VISIT(s->busy);
  Py_VISIT(s->outcome);
  return 0;
}

static int server_clear(ServerObject *s) {
  Py_CLEAR(s->chan);
  Py_CLEAR(s->objects);
  Py_CLEAR(s->tensor_type);
  Py_CLEAR(s->sync);
  Py_CLEAR(s->lock);
  Py_CLEAR(s->acquire);
  Py_CLEAR(s->release);
  Py_CLEAR(s->locked);
  Py_CLEAR(s->activity);
  Py_CLEAR(s->busy);
  Py_CLEAR(s->outcome);
  return 0;
}

static void server_dealloc(ServerObject *s) {
  PyObject_GC_UnTrack(s);
  server_clear(s);
  Py_TYPE(s)->tp_free((PyObject *)s);
}

static PyObject *server_get_calling(ServerObject *s, void *unused) {
  (void)unused;
  return PyBool_FromLong(s->calling);
}

static PyObject *server_get_served(ServerObject *s, void *unused) {
  (void)unused;
  return PyLong_FromUnsignedLongLong(s->served);
}

static PyMethodDef server_methods[] = {
    {"next_request", (PyCFunction)server_next_request, METH_NOARGS,
     "next_request() -> frame: serve what the fast path serves; return the next request for Python"},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef server_getset[] = {
    {"calling", (getter)server_get_calling, NULL, "whether a function runs on the fast path now", NULL},
    {"served", (getter)server_get_served, NULL, "how many requests the fast path answered", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject ServerType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "workbench.rpc.server._serve.Server",
    .tp_basicsize = sizeof(ServerObject),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "Server(fd, chan, objects, tensor_type, sync, lock, activity, busy, outcome, spin_us=0): "
              "a session worker's fast path for CALL requests (see _serve.c)",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)server_init,
    .tp_traverse = (traverseproc)server_traverse,
    .tp_clear = (inquiry)server_clear,
    .tp_dealloc = (destructor)server_dealloc,
    .tp_methods = server_methods,
    .tp_getset = server_getset,
};

static struct PyModuleDef serve_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "_serve",
    .m_doc = "rpc-workbench: the session worker's fast path for CALL requests",
    .m_size = -1,
};

PyMODINIT_FUNC PyInit__serve(void) {
  static struct {
    PyObject **name;
    const char *text;
  } names[] = {{&str_buf, "_buf"}, {&str_start, "_start"}, {&str_end, "_end"}, {&str_recv_frame, "recv_frame"},
               {&str_acquire, "acquire"}, {&str_release, "release"}, {&str_locked, "locked"}};
  for (size_t i = 0; i < sizeof names / sizeof names[0]; i++)
    if (*names[i].name == NULL && (*names[i].name = PyUnicode_InternFromString(names[i].text)) == NULL) return NULL;
  if (PyType_Ready(&ServerType) < 0) return NULL;
  PyObject *module = PyModule_Create(&serve_module);
  if (module == NULL) return NULL;
  if (PyModule_AddObjectRef(module, "Server", (PyObject *)&ServerType) < 0) {
    Py_DECREF(module);
    return NULL;
  }
  return module;
}
