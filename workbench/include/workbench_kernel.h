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
 *       DLTensor* a = WB_ARG_TENSOR(0);
 *       DLTensor* b = WB_ARG_TENSOR(1);
 *       float* x = (float*)a->data; float* y = (float*)b->data;
 *       for (int64_t i = 0; i < a->shape[0]; ++i) y[i] = x[i] + 1.0f;
 *       return 0;
 *     }
 */
#ifndef WORKBENCH_KERNEL_H_
#define WORKBENCH_KERNEL_H_

#include <stdint.h>
#include <stdio.h>

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
  kTVMFFIRawStr = 8
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

#define WB_ARG_TENSOR(i) ((DLTensor*)args[i].v_ptr)
#define WB_ARG_INT(i) (args[i].v_int64)
#define WB_ARG_FLOAT(i) (args[i].v_float64)

#define WB_RETURN_INT(x) do { ret->type_index = kTVMFFIInt; ret->v_int64 = (int64_t)(x); return 0; } while (0)
#define WB_RETURN_FLOAT(x) do { ret->type_index = kTVMFFIFloat; ret->v_float64 = (double)(x); return 0; } while (0)

#ifdef __cplusplus
}
#endif
#endif /* WORKBENCH_KERNEL_H_ */
