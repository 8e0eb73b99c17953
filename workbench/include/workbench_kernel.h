/*
 * workbench_kernel.h: write kernels that rpc-workbench (and TVM) can load.
 *
 * The ABI is the TVM FFI packed C ABI: export each kernel as
 *     int __tvm_ffi_<name>(void* self, const TVMFFIAny* args, int32_t nargs, TVMFFIAny* ret)
 * returning 0 on success, or -1 after reporting an error with WB_FAIL.
 *
 * Example (add_one.c, compile with `cc -shared -fPIC -O2 -I$(python -m workbench.cc --include) ...`):
 *
 *     #include <workbench_kernel.h>
 *     WB_KERNEL(add_one) {
 *       WB_EXPECT_ARGS(2);
 *       DLTensor* a = WB_ARG_TENSOR_OF(0, float32, 1);   // a 1-d float32 tensor, or a TypeError
 *       DLTensor* b = WB_ARG_TENSOR_OF(1, float32, 1);
 *       float* x = (float*)a->data; float* y = (float*)b->data;
 *       for (int64_t i = 0; i < a->shape[0]; ++i) y[i] = x[i] + 1.0f;
 *       return 0;
 *     }
 *
 * Checked arguments.  Every WB_ARG_* macro checks what the caller passed and, when it does not fit,
 * makes the kernel fail (return -1) with a TypeError that names the argument, the kernel, what was
 * expected and what came, e.g. "argument 0 of add_one: expected a 1-d float32 tensor, got a float (1.5)":
 *
 *     WB_EXPECT_ARGS(n)                exactly n arguments
 *     WB_ARG_TENSOR(i)                 DLTensor* of any dtype and ndim
 *     WB_ARG_TENSOR_OF(i, dtype, ndim) DLTensor* of that dtype and ndim; dtype is a name token
 *                                      (int8 int16 int32 int64 uint8 uint16 uint32 uint64 float16
 *                                      float32 float64 bfloat16 complex64 complex128 bool, or any),
 *                                      ndim -1 (WB_ANY_NDIM) takes any ndim
 *     WB_ARG_INT(i)                    int64_t from an int or a bool
 *     WB_ARG_FLOAT(i)                  double from a float, or from an int or bool (exactly, up to 2^53)
 *
 * They are GNU statement expressions (gcc, clang and their C++ compilers) and may only be used in
 * the body of a WB_KERNEL, where `args` and `nargs` are the call's arguments.  A kernel that
 * handles several types itself reads args[i].type_index and args[i].v_ptr / v_int64 / v_float64.
 */
#ifndef WORKBENCH_KERNEL_H_
#define WORKBENCH_KERNEL_H_

#include <stdint.h>
#include <stdio.h>
#include <string.h>

#ifdef __cplusplus
extern "C" {
#endif

/* DLPack (v0.8+) tensor layout. */
typedef struct { int32_t device_type; int32_t device_id; } DLDevice;
typedef struct { uint8_t code; uint8_t bits; uint16_t lanes; } DLDataType;
typedef struct {
  void* data;
  DLDevice device;
  int32_t ndim;
  DLDataType dtype;
  int64_t* shape;
  int64_t* strides; /* NULL means compact row-major */
  uint64_t byte_offset;
} DLTensor;

/* TVM FFI type indices used by rpc-workbench. */
enum {
  kTVMFFINone = 0,
  kTVMFFIInt = 1,
  kTVMFFIBool = 2,
  kTVMFFIFloat = 3,
  kTVMFFIOpaquePtr = 4,
  kTVMFFIDLTensorPtr = 7,
  kTVMFFIRawStr = 8,
  kTVMFFIByteArrayPtr = 9,
  kTVMFFISmallStr = 11,
  kTVMFFISmallBytes = 12,
  kTVMFFIStr = 65,
  kTVMFFIBytes = 66,
  kTVMFFIFunction = 68,
  kTVMFFIShape = 69,
  kTVMFFITensor = 70, /* a TVM tensor object (TVM's runtime passes these): its DLTensor follows a 24-byte header */
  kTVMFFIArray = 71,
  kTVMFFIMap = 72,
  kTVMFFIModule = 73
};

typedef struct {
  int32_t type_index;
  uint32_t zero_padding;
  union {
    int64_t v_int64;
    double v_float64;
    void* v_ptr;
    const char* v_c_str;
  };
} TVMFFIAny;

/* Provided by the loader (rpc-workbench's shim, or the TVM runtime). */
void TVMFFIErrorSetRaisedFromCStrParts(const char* kind, const char** parts, int32_t num_parts);

#define WB_KERNEL(name) \
  __attribute__((visibility("default"))) int __tvm_ffi_##name(void* self, const TVMFFIAny* args, int32_t nargs, TVMFFIAny* ret)

/* Report an error of the given kind ("ValueError", "TypeError", ...) and return -1. */
#define WB_FAIL(kind, ...)                                              \
  do {                                                                  \
    char wb_msg_[512];                                                  \
    const char* wb_parts_[1] = {wb_msg_};                               \
    snprintf(wb_msg_, sizeof(wb_msg_), __VA_ARGS__);                    \
    TVMFFIErrorSetRaisedFromCStrParts(kind, wb_parts_, 1);              \
    return -1;                                                          \
  } while (0)

#define WB_EXPECT_ARGS(n)                                                         \
  do {                                                                            \
    if (nargs != (n)) WB_FAIL("TypeError", "expected %d arguments, got %d", (int)(n), (int)nargs); \
  } while (0)

/* -- checked arguments (see the top of this file) ----------------------------------------------- */
#define WB_ANY_NDIM (-1)

/* dtype name tokens: DLPack type code and bits (code -1: any dtype) */
#define WB_DTYPE_CODE_int8 0
#define WB_DTYPE_BITS_int8 8
#define WB_DTYPE_CODE_int16 0
#define WB_DTYPE_BITS_int16 16
#define WB_DTYPE_CODE_int32 0
#define WB_DTYPE_BITS_int32 32
#define WB_DTYPE_CODE_int64 0
#define WB_DTYPE_BITS_int64 64
#define WB_DTYPE_CODE_uint8 1
#define WB_DTYPE_BITS_uint8 8
#define WB_DTYPE_CODE_uint16 1
#define WB_DTYPE_BITS_uint16 16
#define WB_DTYPE_CODE_uint32 1
#define WB_DTYPE_BITS_uint32 32
#define WB_DTYPE_CODE_uint64 1
#define WB_DTYPE_BITS_uint64 64
#define WB_DTYPE_CODE_float16 2
#define WB_DTYPE_BITS_float16 16
#define WB_DTYPE_CODE_float32 2
#define WB_DTYPE_BITS_float32 32
#define WB_DTYPE_CODE_float64 2
#define WB_DTYPE_BITS_float64 64
#define WB_DTYPE_CODE_bfloat16 4
#define WB_DTYPE_BITS_bfloat16 16
#define WB_DTYPE_CODE_complex64 5
#define WB_DTYPE_BITS_complex64 64
#define WB_DTYPE_CODE_complex128 5
#define WB_DTYPE_BITS_complex128 128
#define WB_DTYPE_CODE_bool 6
#define WB_DTYPE_BITS_bool 8
#define WB_DTYPE_CODE_any (-1)
#define WB_DTYPE_BITS_any 0

#define WB_ARG_TENSOR(i) WB_ARG_TENSOR_OF(i, any, WB_ANY_NDIM)
#define WB_ARG_TENSOR_OF(i, dtype, ndim)                                                              \
  __extension__({                                                                                     \
    DLTensor* wb_tensor_ = wb_arg_tensor_(args, nargs, (i), WB_DTYPE_CODE_##dtype, WB_DTYPE_BITS_##dtype, \
                                          #dtype, (ndim), __func__);                                  \
    if (!wb_tensor_) return -1;                                                                       \
    wb_tensor_;                                                                                       \
  })
#define WB_ARG_INT(i)                                                          \
  __extension__({                                                              \
    int64_t wb_int_;                                                           \
    if (wb_arg_int_(args, nargs, (i), __func__, &wb_int_) != 0) return -1;      \
    wb_int_;                                                                   \
  })
#define WB_ARG_FLOAT(i)                                                        \
  __extension__({                                                              \
    double wb_float_;                                                          \
    if (wb_arg_float_(args, nargs, (i), __func__, &wb_float_) != 0) return -1;  \
    wb_float_;                                                                 \
  })

/* What the checks above call; not meant to be called directly. */
static inline const char* wb_kernel_name_(const char* func) {
  return strncmp(func, "__tvm_ffi_", 10) == 0 ? func + 10 : func;
}

/* "an 8-d", "an 11-d", "an 18-d", "a 2-d" */
static inline int wb_an_(int32_t n) { return n == 8 || n == 11 || n == 18 || (n >= 80 && n < 90); }

static inline void wb_dtype_name_(int code, int bits, int lanes, char* out, size_t cap) {
  static const char* const names[] = {"int", "uint", "float", "handle", "bfloat", "complex", "bool"};
  if (code == 6 && bits == 8) snprintf(out, cap, "bool");
  else if (code >= 0 && code <= 5) snprintf(out, cap, "%s%d", names[code], bits);
  else snprintf(out, cap, "dtype(code %d, %d bits)", code, bits);
  if (lanes != 1) {
    size_t used = strlen(out);
    snprintf(out + used, cap - used, "x%d", lanes);
  }
}

/* "an int32 tensor of shape (4, 2)" */
static inline void wb_tensor_text_(const DLTensor* t, char* out, size_t cap) {
  char dt[40];
  size_t used;
  wb_dtype_name_(t->dtype.code, t->dtype.bits, t->dtype.lanes, dt, sizeof dt);
  used = (size_t)snprintf(out, cap, "%s %s tensor of shape (", dt[0] == 'i' ? "an" : "a", dt);
  for (int32_t d = 0; d < t->ndim && used < cap; ++d)
    used += (size_t)snprintf(out + used, cap - used, d ? ", %lld" : "%lld", (long long)t->shape[d]);
  if (used < cap) snprintf(out + used, cap - used, t->ndim == 1 ? ",)" : ")");
}

/* What argument i is, in Python's words: "a float (1.5)", "an int (3)", "None", "a float32 tensor of shape (4,)". */
static inline void wb_arg_text_(const TVMFFIAny* a, char* out, size_t cap) {
  switch (a->type_index) {
    case kTVMFFINone: snprintf(out, cap, "None"); break;
    case kTVMFFIInt: snprintf(out, cap, "an int (%lld)", (long long)a->v_int64); break;
    case kTVMFFIBool: snprintf(out, cap, "a bool (%s)", a->v_int64 ? "True" : "False"); break;
    case kTVMFFIFloat: snprintf(out, cap, "a float (%g)", a->v_float64); break;
    case kTVMFFIOpaquePtr: snprintf(out, cap, "an opaque pointer (%p)", a->v_ptr); break;
    case kTVMFFIDLTensorPtr:
    case kTVMFFITensor: {
      const DLTensor* t = (const DLTensor*)(a->type_index == kTVMFFITensor ? (const char*)a->v_ptr + 24 : a->v_ptr);
      if (!a->v_ptr) snprintf(out, cap, "a null tensor pointer");
      else wb_tensor_text_(t, out, cap);
      break;
    }
    case kTVMFFIRawStr: snprintf(out, cap, "a str (\"%.40s\")", a->v_c_str ? a->v_c_str : ""); break;
    case kTVMFFISmallStr: case kTVMFFIStr: snprintf(out, cap, "a str"); break;
    case kTVMFFIByteArrayPtr: case kTVMFFISmallBytes: case kTVMFFIBytes: snprintf(out, cap, "bytes"); break;
    case kTVMFFIFunction: snprintf(out, cap, "a function"); break;
    case kTVMFFIShape: snprintf(out, cap, "a shape"); break;
    case kTVMFFIArray: snprintf(out, cap, "an array (a list)"); break;
    case kTVMFFIMap: snprintf(out, cap, "a map (a dict)"); break;
    case kTVMFFIModule: snprintf(out, cap, "a module"); break;
    default: snprintf(out, cap, "a value of FFI type %d", (int)a->type_index); break;
  }
}

static inline void wb_arg_fail_(int32_t i, const char* func, const char* expected, const TVMFFIAny* args,
                                int32_t nargs, const char* hint) {
  char given[160], msg[480];
  const char* parts[1] = {msg};
  if (i < 0 || i >= nargs) snprintf(given, sizeof given, "nothing (the call passed %d arguments)", (int)nargs);
  else wb_arg_text_(&args[i], given, sizeof given);
  snprintf(msg, sizeof msg, "argument %d of %s: expected %s, got %s%s", (int)i, wb_kernel_name_(func), expected,
           given, hint ? hint : "");
  TVMFFIErrorSetRaisedFromCStrParts("TypeError", parts, 1);
}

static inline DLTensor* wb_arg_tensor_(const TVMFFIAny* args, int32_t nargs, int32_t i, int code, int bits,
                                       const char* dtype, int32_t ndim, const char* func) {
  char expected[80], hint[96];
  DLTensor* t = NULL;
  int ok;
  if (i >= 0 && i < nargs && args[i].v_ptr) {
    if (args[i].type_index == kTVMFFIDLTensorPtr) t = (DLTensor*)args[i].v_ptr;
    else if (args[i].type_index == kTVMFFITensor) t = (DLTensor*)((char*)args[i].v_ptr + 24);
  }
  ok = t != NULL && (code < 0 || (t->dtype.code == code && t->dtype.bits == bits && t->dtype.lanes == 1)) &&
       (ndim < 0 || t->ndim == ndim);
  if (ok) return t;
  if (code < 0 && ndim < 0) snprintf(expected, sizeof expected, "a tensor");
  else if (code < 0) snprintf(expected, sizeof expected, "%s %d-d tensor", wb_an_(ndim) ? "an" : "a", (int)ndim);
  else if (ndim < 0) snprintf(expected, sizeof expected, "%s %s tensor", dtype[0] == 'i' ? "an" : "a", dtype);
  else snprintf(expected, sizeof expected, "%s %d-d %s tensor", wb_an_(ndim) ? "an" : "a", (int)ndim, dtype);
  hint[0] = '\0';
  if (t != NULL && code >= 0 && !(t->dtype.code == code && t->dtype.bits == bits && t->dtype.lanes == 1))
    snprintf(hint, sizeof hint, "; convert it first, e.g. runtime.tensor(x.astype(\"%s\"), dev)", dtype);
  else if (t == NULL)
    snprintf(hint, sizeof hint, "; make one with runtime.tensor(x, dev) or runtime.empty(shape, dtype, dev)");
  wb_arg_fail_(i, func, expected, args, nargs, hint);
  return NULL;
}

static inline int wb_arg_int_(const TVMFFIAny* args, int32_t nargs, int32_t i, const char* func, int64_t* out) {
  if (i >= 0 && i < nargs && (args[i].type_index == kTVMFFIInt || args[i].type_index == kTVMFFIBool)) {
    *out = args[i].v_int64;
    return 0;
  }
  wb_arg_fail_(i, func, "an int", args, nargs, NULL);
  return -1;
}

static inline int wb_arg_float_(const TVMFFIAny* args, int32_t nargs, int32_t i, const char* func, double* out) {
  if (i >= 0 && i < nargs) {
    if (args[i].type_index == kTVMFFIFloat) {
      *out = args[i].v_float64;
      return 0;
    }
    if ((args[i].type_index == kTVMFFIInt || args[i].type_index == kTVMFFIBool) &&
        args[i].v_int64 <= (INT64_C(1) << 53) && args[i].v_int64 >= -(INT64_C(1) << 53)) {
      *out = (double)args[i].v_int64; /* exact */
      return 0;
    }
  }
  wb_arg_fail_(i, func, "a float", args, nargs,
               i >= 0 && i < nargs && args[i].type_index == kTVMFFIInt ? " (too large for a double exactly)" : NULL);
  return -1;
}

#define WB_RETURN_INT(x) do { ret->type_index = kTVMFFIInt; ret->v_int64 = (int64_t)(x); return 0; } while (0)
#define WB_RETURN_FLOAT(x) do { ret->type_index = kTVMFFIFloat; ret->v_float64 = (double)(x); return 0; } while (0)

#ifdef __cplusplus
}
#endif
#endif /* WORKBENCH_KERNEL_H_ */
