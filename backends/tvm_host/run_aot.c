/* effc's ahead-of-time executor for TVM-compiled kernels: runs a model as the fixed sequence of
 * TensorIR kernel calls effc planned (backends/tvm_aot.py), with no TVM runtime. Built for
 * wasm32 (clang --target=wasm32-wasi, SIMD128) and run under a WASI runtime, or natively for a
 * check of the executor itself. Linked with the kernels' object file (TVM's llvm codegen) and a
 * generated table of their entry points (effc_kernels).
 *
 *   run_aot ARTIFACT_DIR IO_DIR [REPEAT]
 *
 * ARTIFACT_DIR holds plan.txt (storages, tensor views, steps) and weights.bin (the constants,
 * 64-byte aligned); IO_DIR holds in<i>.bin (raw inputs, C order) and receives out<i>.bin.
 * The model runs REPEAT times (default 1); one line reports the median and the fastest run:
 *   effc-aot runs=R median_ns=... min_ns=...
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <tvm/ffi/c_api.h>

typedef int (*Kernel)(void* self, const TVMFFIAny* args, int32_t num_args, TVMFFIAny* result);
extern const int effc_num_kernels;
extern const Kernel effc_kernels[];

/* ---- what compiled kernels call back into (TVM's backend API, single-threaded) ---- */
typedef struct {
  void* sync_handle;
  int32_t num_task;
} ParallelEnv;
typedef int (*ParallelLambda)(int task_id, ParallelEnv* penv, void* cdata);

static void* alloc_workspace(int device_type, int device_id, uint64_t nbytes, int code, int bits) {
  (void)device_type, (void)device_id, (void)code, (void)bits;
  return aligned_alloc(64, (nbytes + 63) / 64 * 64 + 64);
}
static int free_workspace(int device_type, int device_id, void* ptr) {
  (void)device_type, (void)device_id;
  free(ptr);
  return 0;
}
int TVMBackendParallelLaunch(ParallelLambda flambda, void* cdata, int num_task) {
  (void)num_task;
  ParallelEnv env = {NULL, 1};
  return flambda(0, &env, cdata);
}
int TVMBackendParallelBarrier(int task_id, ParallelEnv* penv) {
  (void)task_id, (void)penv;
  return 0;
}
void TVMFFIErrorSetRaisedFromCStr(const char* kind, const char* message) {
  fprintf(stderr, "%s: %s\n", kind, message);
}
void TVMFFIErrorSetRaisedFromCStrParts(const char* kind, const char** parts, int32_t n) {
  fprintf(stderr, "%s: ", kind);
  for (int32_t i = 0; i < n; ++i) fputs(parts[i] ? parts[i] : "", stderr);
  fputc('\n', stderr);
}
/* the context pointers TVM's codegen reads these hooks through */
void* __TVMBackendAllocWorkspace = (void*)&alloc_workspace;
void* __TVMBackendFreeWorkspace = (void*)&free_workspace;
void* __TVMBackendParallelLaunch = (void*)&TVMBackendParallelLaunch;
void* __TVMBackendParallelBarrier = (void*)&TVMBackendParallelBarrier;
void* __TVMFFIErrorSetRaisedFromCStr = (void*)&TVMFFIErrorSetRaisedFromCStr;

/* ---- the plan ---- */
typedef struct {
  int64_t nbytes;
  char kind; /* c: constant, i: input, t: temporary, o: output */
  int64_t where; /* constant: offset in weights.bin; input/output: its index */
  void* data;
} Storage;

typedef struct {
  int storage;
  DLTensor t;
  int64_t shape[8];
} View;

typedef struct {
  int kernel, nargs, nalloc, nfree;
  int *args, *alloc, *free;
} Step;

static int fail(const char* what, const char* detail) {
  fprintf(stderr, "effc-aot: %s%s%s\n", what, detail ? ": " : "", detail ? detail : "");
  return 2;
}

static int read_ints(FILE* f, int n, int** out) {
  *out = (int*)calloc(n > 0 ? n : 1, sizeof(int));
  for (int i = 0; i < n; ++i)
    if (fscanf(f, "%d", &(*out)[i]) != 1) return 0;
  return 1;
}

static void* read_file(const char* path, int64_t expect) {
  FILE* f = fopen(path, "rb");
  if (!f) return NULL;
  void* data = aligned_alloc(64, (expect + 63) / 64 * 64 + 64);
  size_t got = fread(data, 1, (size_t)expect, f);
  fclose(f);
  if ((int64_t)got != expect) {
    free(data);
    return NULL;
  }
  return data;
}

static int64_t now_ns(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

static int cmp_i64(const void* a, const void* b) {
  int64_t x = *(const int64_t*)a, y = *(const int64_t*)b;
  return (x > y) - (x < y);
}

int main(int argc, char** argv) {
  if (argc < 3) return fail("usage: run_aot ARTIFACT_DIR IO_DIR [REPEAT]", NULL);
  int repeat = argc > 3 ? atoi(argv[3]) : 1;
  if (repeat < 1) repeat = 1;
  char path[4096];
  snprintf(path, sizeof path, "%s/plan.txt", argv[1]);
  FILE* f = fopen(path, "r");
  if (!f) return fail("cannot open", path);
  int version, ns, nv, nk, ni, no;
  int64_t weight_bytes;
  if (fscanf(f, "effc-aot %d weights %lld storages %d", &version, (long long*)&weight_bytes, &ns) != 3 ||
      version != 1)
    return fail("not an effc-aot plan (version 1)", path);
  Storage* st = (Storage*)calloc(ns, sizeof(Storage));
  for (int i = 0; i < ns; ++i)
    if (fscanf(f, "%lld %c %lld", (long long*)&st[i].nbytes, &st[i].kind, (long long*)&st[i].where) != 3)
      return fail("bad storage line in", path);
  if (fscanf(f, " views %d", &nv) != 1) return fail("bad views header in", path);
  View* vw = (View*)calloc(nv, sizeof(View));
  for (int i = 0; i < nv; ++i) {
    int code, bits, ndim;
    if (fscanf(f, "%d %d %d %d", &vw[i].storage, &code, &bits, &ndim) != 4 || ndim > 8)
      return fail("bad view line in", path);
    for (int d = 0; d < ndim; ++d)
      if (fscanf(f, "%lld", (long long*)&vw[i].shape[d]) != 1) return fail("bad view dims in", path);
    vw[i].t.ndim = ndim;
    vw[i].t.shape = vw[i].shape;
    vw[i].t.dtype.code = (uint8_t)code;
    vw[i].t.dtype.bits = (uint8_t)bits;
    vw[i].t.dtype.lanes = 1;
    vw[i].t.device.device_type = kDLCPU;
  }
  if (fscanf(f, " steps %d", &nk) != 1) return fail("bad steps header in", path);
  Step* steps = (Step*)calloc(nk, sizeof(Step));
  int maxargs = 1;
  for (int i = 0; i < nk; ++i) {
    Step* s = &steps[i];
    if (fscanf(f, "%d %d", &s->kernel, &s->nargs) != 2 || s->kernel < 0 ||
        s->kernel >= effc_num_kernels || !read_ints(f, s->nargs, &s->args) ||
        fscanf(f, "%d", &s->nalloc) != 1 || !read_ints(f, s->nalloc, &s->alloc) ||
        fscanf(f, "%d", &s->nfree) != 1 || !read_ints(f, s->nfree, &s->free))
      return fail("bad step line in", path);
    if (s->nargs > maxargs) maxargs = s->nargs;
  }
  int *inputs, *outputs;
  if (fscanf(f, " inputs %d", &ni) != 1 || !read_ints(f, ni, &inputs) ||
      fscanf(f, " outputs %d", &no) != 1 || !read_ints(f, no, &outputs))
    return fail("bad inputs/outputs in", path);
  fclose(f);

  snprintf(path, sizeof path, "%s/weights.bin", argv[1]);
  char* weights = weight_bytes ? (char*)read_file(path, weight_bytes) : NULL;
  if (weight_bytes && !weights) return fail("cannot read (or short)", path);
  for (int i = 0; i < ns; ++i) {
    if (st[i].kind == 'c') st[i].data = weights + st[i].where;
    if (st[i].kind == 'i') {
      snprintf(path, sizeof path, "%s/in%lld.bin", argv[2], (long long)st[i].where);
      if (!(st[i].data = read_file(path, st[i].nbytes))) return fail("cannot read (or short)", path);
    }
    if (st[i].kind == 'o') st[i].data = aligned_alloc(64, (st[i].nbytes + 63) / 64 * 64 + 64);
  }

  TVMFFIAny* args = (TVMFFIAny*)calloc(maxargs, sizeof(TVMFFIAny));
  int64_t* times = (int64_t*)calloc(repeat, sizeof(int64_t));
  for (int r = 0; r < repeat; ++r) {
    int64_t t0 = now_ns();
    for (int k = 0; k < nk; ++k) {
      Step* s = &steps[k];
      for (int a = 0; a < s->nalloc; ++a) {
        Storage* x = &st[s->alloc[a]];
        x->data = aligned_alloc(64, (x->nbytes + 63) / 64 * 64 + 64);
      }
      for (int a = 0; a < s->nargs; ++a) {
        View* v = &vw[s->args[a]];
        v->t.data = st[v->storage].data;
        memset(&args[a], 0, sizeof(TVMFFIAny));
        args[a].type_index = kTVMFFIDLTensorPtr;
        args[a].v_ptr = &v->t;
      }
      TVMFFIAny result;
      memset(&result, 0, sizeof result);
      if (effc_kernels[s->kernel](NULL, args, s->nargs, &result) != 0) {
        char step[32];
        snprintf(step, sizeof step, "%d", k);
        return fail("kernel failed at step", step);
      }
      for (int a = 0; a < s->nfree; ++a) {
        free(st[s->free[a]].data);
        st[s->free[a]].data = NULL;
      }
    }
    times[r] = now_ns() - t0;
  }
  for (int i = 0; i < no; ++i) {
    View* v = &vw[outputs[i]];
    snprintf(path, sizeof path, "%s/out%d.bin", argv[2], i);
    FILE* o = fopen(path, "wb");
    if (!o || fwrite(st[v->storage].data, 1, (size_t)st[v->storage].nbytes, o) !=
                  (size_t)st[v->storage].nbytes)
      return fail("cannot write", path);
    fclose(o);
  }
  (void)inputs;
  qsort(times, repeat, sizeof(int64_t), cmp_i64);
  printf("effc-aot runs=%d median_ns=%lld min_ns=%lld\n", repeat, (long long)times[repeat / 2],
         (long long)times[0]);
  return 0;
}
