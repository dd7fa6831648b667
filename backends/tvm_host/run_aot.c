/* effc's ahead-of-time executor for TVM-compiled kernels: runs a model as the fixed sequence of
 * TensorIR kernel calls effc planned (backends/tvm_aot.py), with no TVM runtime. Linked with
 * the kernels' object file (TVM's llvm codegen) and a generated table of their entry points
 * (effc_kernels), it builds three ways:
 *
 *   wasm32 (clang --target=wasm32-wasi, SIMD128): a WASI command run under a WebAssembly runtime;
 *   native, -DEFFC_AOT_LIBRARY: a shared library Python calls in process (effc_aot_open/run);
 *   native command: the same main() as wasm32, to check the executor without WebAssembly.
 *
 *   run_aot ARTIFACT_DIR IO_DIR [REPEAT]
 *
 * ARTIFACT_DIR holds plan.txt and weights.bin (the constants, 64-byte aligned); IO_DIR holds
 * in<i>.bin (raw inputs, C order) and receives out<i>.bin. The model runs REPEAT times
 * (default 1); one line reports the median and the fastest run:
 *   effc-aot runs=R median_ns=... min_ns=...
 * With EFFC_AOT_PROFILE=1 each step's mean time follows on stderr.
 *
 * Memory: the planner gives every temporary an offset in one arena, reused by tensors whose
 * lifetimes do not overlap, so a run allocates nothing. Natively, parallel loops run on a pool
 * of TVM_NUM_THREADS threads (default: the online CPUs); wasm32 runs single-threaded.
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

/* ---- what compiled kernels call back into (TVM's backend API) ---- */
typedef struct {
  void* sync_handle;
  int32_t num_task;
} ParallelEnv;
typedef int (*ParallelLambda)(int task_id, ParallelEnv* penv, void* cdata);

static void* alloc_aligned(int64_t nbytes) {
  return aligned_alloc(64, (size_t)((nbytes + 63) / 64 * 64 + 64));
}
static void* alloc_workspace(int device_type, int device_id, uint64_t nbytes, int code, int bits) {
  (void)device_type, (void)device_id, (void)code, (void)bits;
  return alloc_aligned((int64_t)nbytes);
}
static int free_workspace(int device_type, int device_id, void* ptr) {
  (void)device_type, (void)device_id;
  free(ptr);
  return 0;
}

#if defined(__wasm__) || defined(EFFC_AOT_SINGLE_THREAD)
int TVMBackendParallelLaunch(ParallelLambda flambda, void* cdata, int num_task) {
  (void)num_task;
  ParallelEnv env = {NULL, 1};
  return flambda(0, &env, cdata);
}
int TVMBackendParallelBarrier(int task_id, ParallelEnv* penv) {
  (void)task_id, (void)penv;
  return 0;
}
static void pool_start(void) {}
#define RUN_LOCK()
#define RUN_UNLOCK()
#else
/* The caller runs task 0 and the workers the others. An idle worker spins on a generation
 * counter for up to POOL_SPIN_NS (a model launches one parallel loop per kernel, microseconds
 * apart), then sleeps on a condition variable, so a loaded model costs no CPU between calls. */
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <unistd.h>
#define POOL_SPIN_NS 200000
static pthread_mutex_t pool_mutex = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t pool_cond = PTHREAD_COND_INITIALIZER;
static int pool_n = 1;
static ParallelLambda pool_f;
static void* pool_cdata;
static int pool_ntask;
static atomic_long pool_gen, pool_done, pool_sleepers, bar_count, bar_gen;
static atomic_int pool_rc;

static int64_t now_ns(void);

static void cpu_relax(void) {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#elif defined(__aarch64__)
  __asm__ __volatile__("yield");
#endif
}
/* wait until *v differs from old: spin, then sleep (sleep=0: spin, then yield) */
static void pool_wait(atomic_long* v, long old, int sleep) {
  int64_t t0 = 0;
  for (int i = 1; atomic_load(v) == old; ++i) {
    cpu_relax();
    if (i % 256) continue;
    if (!t0) t0 = now_ns();
    if (now_ns() - t0 < POOL_SPIN_NS) continue;
    if (!sleep) {
      sched_yield();
      continue;
    }
    pthread_mutex_lock(&pool_mutex);
    atomic_fetch_add(&pool_sleepers, 1);
    while (atomic_load(v) == old) pthread_cond_wait(&pool_cond, &pool_mutex);
    atomic_fetch_sub(&pool_sleepers, 1);
    pthread_mutex_unlock(&pool_mutex);
  }
}
static void* pool_worker(void* arg) {
  int id = (int)(intptr_t)arg;
  long seen = 0;
  for (;;) {
    pool_wait(&pool_gen, seen, 1);
    seen = atomic_load(&pool_gen);
    if (id < pool_ntask) {
      ParallelEnv env = {NULL, pool_ntask};
      if (pool_f(id, &env, pool_cdata) != 0) atomic_store(&pool_rc, -1);
    }
    atomic_fetch_add(&pool_done, 1);
  }
  return NULL;
}
static void pool_init(void) {
  /* a fresh pool (also in a forked child, whose copy of these holds its parent's state) */
  atomic_store(&pool_gen, 0), atomic_store(&pool_done, 0), atomic_store(&pool_sleepers, 0);
  atomic_store(&bar_count, 0), atomic_store(&bar_gen, 0);
  pthread_mutex_init(&pool_mutex, NULL);
  pthread_cond_init(&pool_cond, NULL);
  const char* env = getenv("TVM_NUM_THREADS");
  pool_n = env && atoi(env) > 0 ? atoi(env) : (int)sysconf(_SC_NPROCESSORS_ONLN);
  if (pool_n < 1) pool_n = 1;
  for (int i = 1; i < pool_n; ++i) {
    pthread_t t;
    if (pthread_create(&t, NULL, pool_worker, (void*)(intptr_t)i) != 0) {
      pool_n = i;
      break;
    }
    pthread_detach(t);
  }
}
static pid_t pool_pid;
/* once a process: a forked child (multiprocessing) has none of its parent's workers */
static void pool_start(void) {
  if (pool_pid != getpid()) {
    pool_pid = getpid();
    pool_init();
  }
}
/* one model run at a time per process: the pool runs one parallel loop, and a model's arena
 * holds one run (ctypes releases the GIL, so Python threads could call in together) */
static pthread_mutex_t run_mutex = PTHREAD_MUTEX_INITIALIZER;
#define RUN_LOCK() pthread_mutex_lock(&run_mutex)
#define RUN_UNLOCK() pthread_mutex_unlock(&run_mutex)
/* a fork waits for the run in progress (another thread's) to end: the child then copies an
 * unlocked run mutex and an arena no kernel is writing, instead of a lock no thread of its will
 * ever release */
static void fork_prepare(void) { RUN_LOCK(); }
static void fork_release(void) { RUN_UNLOCK(); }
__attribute__((constructor)) static void register_fork(void) {
  pthread_atfork(fork_prepare, fork_release, fork_release);
}
int TVMBackendParallelLaunch(ParallelLambda flambda, void* cdata, int num_task) {
  int n = num_task <= 0 || num_task > pool_n ? pool_n : num_task;
  ParallelEnv env = {NULL, n};
  if (n == 1) return flambda(0, &env, cdata);
  pool_f = flambda, pool_cdata = cdata, pool_ntask = n;
  atomic_store(&pool_rc, 0);
  atomic_store(&pool_done, 0);
  atomic_fetch_add(&pool_gen, 1);
  if (atomic_load(&pool_sleepers) > 0) {
    pthread_mutex_lock(&pool_mutex);
    pthread_cond_broadcast(&pool_cond);
    pthread_mutex_unlock(&pool_mutex);
  }
  int rc = flambda(0, &env, cdata);
  while (atomic_load(&pool_done) < pool_n - 1) cpu_relax();
  return rc != 0 ? rc : atomic_load(&pool_rc);
}
int TVMBackendParallelBarrier(int task_id, ParallelEnv* penv) {
  (void)task_id;
  long gen = atomic_load(&bar_gen);
  if (atomic_fetch_add(&bar_count, 1) == penv->num_task - 1) {
    atomic_store(&bar_count, 0);
    atomic_fetch_add(&bar_gen, 1);
  } else {
    pool_wait(&bar_gen, gen, 0);
  }
  return 0;
}
#endif

static char last_error[512];
void TVMFFIErrorSetRaisedFromCStr(const char* kind, const char* message) {
  snprintf(last_error, sizeof last_error, "%s: %s", kind, message);
}
void TVMFFIErrorSetRaisedFromCStrParts(const char* kind, const char** parts, int32_t n) {
  int at = snprintf(last_error, sizeof last_error, "%s: ", kind);
  for (int32_t i = 0; i < n && at < (int)sizeof last_error; ++i)
    at += snprintf(last_error + at, sizeof last_error - at, "%s", parts[i] ? parts[i] : "");
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
  char kind;     /* c: constant, i: input, t: temporary, o: output */
  int64_t where; /* constant: offset in weights.bin; temporary: in the arena; input/output: index */
  void* data;
} Storage;

typedef struct {
  int storage;
  DLTensor t;
  int64_t shape[8];
} View;

typedef struct {
  int kernel, nargs;
  int* args;
  TVMFFIAny* packed;
} Step;

typedef struct {
  int ns, nv, nk, ni, no;
  Storage* st;
  View* vw;
  Step* steps;
  int *inputs, *outputs; /* storages, by input / output index */
  char *weights, *arena;
} Model;

static int64_t now_ns(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

static int fail(const char* what, const char* detail) {
  snprintf(last_error, sizeof last_error, "%s%s%s", what, detail ? ": " : "", detail ? detail : "");
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
  void* data = alloc_aligned(expect);
  size_t got = fread(data, 1, (size_t)expect, f);
  int extra = fgetc(f) != EOF;
  fclose(f);
  if ((int64_t)got != expect || extra) {
    free(data);
    return NULL;
  }
  return data;
}

static int in_range(int i, int n) { return i >= 0 && i < n; }

/* read DIR/plan.txt and DIR/weights.bin into m; 0 or an error (in last_error) */
static int load_plan(const char* dir, Model* m) {
  char path[4096];
  snprintf(path, sizeof path, "%s/plan.txt", dir);
  FILE* f = fopen(path, "r");
  if (!f) return fail("cannot open", path);
  int version;
  long long weight_bytes, arena_bytes;
  if (fscanf(f, "effc-aot %d weights %lld arena %lld storages %d", &version, &weight_bytes,
             &arena_bytes, &m->ns) != 4 ||
      version != 2 || m->ns < 0)
    return fail("not an effc-aot plan of version 2 (rebuild the artifact)", path);
  m->st = (Storage*)calloc(m->ns + 1, sizeof(Storage));
  m->ni = m->no = 0;
  for (int i = 0; i < m->ns; ++i) {
    Storage* s = &m->st[i];
    if (fscanf(f, "%lld %c %lld", (long long*)&s->nbytes, &s->kind, (long long*)&s->where) != 3)
      return fail("bad storage line in", path);
    int64_t limit = s->kind == 'c' ? weight_bytes : s->kind == 't' ? arena_bytes : -1;
    if (limit >= 0 && (s->where < 0 || s->where + s->nbytes > limit))
      return fail("a storage outside its memory in", path);
    if (s->kind == 'i' && s->where + 1 > m->ni) m->ni = (int)s->where + 1;
    if (s->kind == 'o' && s->where + 1 > m->no) m->no = (int)s->where + 1;
  }
  if (fscanf(f, " views %d", &m->nv) != 1 || m->nv < 0) return fail("bad views header in", path);
  m->vw = (View*)calloc(m->nv + 1, sizeof(View));
  for (int i = 0; i < m->nv; ++i) {
    View* v = &m->vw[i];
    int code, bits, ndim;
    if (fscanf(f, "%d %d %d %d", &v->storage, &code, &bits, &ndim) != 4 || ndim > 8 ||
        ndim < 0 || !in_range(v->storage, m->ns))
      return fail("bad view line in", path);
    for (int d = 0; d < ndim; ++d)
      if (fscanf(f, "%lld", (long long*)&v->shape[d]) != 1) return fail("bad view dims in", path);
    v->t.ndim = ndim;
    v->t.shape = v->shape;
    v->t.dtype.code = (uint8_t)code;
    v->t.dtype.bits = (uint8_t)bits;
    v->t.dtype.lanes = 1;
    v->t.device.device_type = kDLCPU;
  }
  if (fscanf(f, " steps %d", &m->nk) != 1 || m->nk < 0) return fail("bad steps header in", path);
  m->steps = (Step*)calloc(m->nk + 1, sizeof(Step));
  for (int i = 0; i < m->nk; ++i) {
    Step* s = &m->steps[i];
    if (fscanf(f, "%d %d", &s->kernel, &s->nargs) != 2 || !in_range(s->kernel, effc_num_kernels) ||
        s->nargs < 0 || !read_ints(f, s->nargs, &s->args))
      return fail("bad step line in", path);
    s->packed = (TVMFFIAny*)calloc(s->nargs + 1, sizeof(TVMFFIAny));
    for (int a = 0; a < s->nargs; ++a) {
      if (!in_range(s->args[a], m->nv)) return fail("bad step line in", path);
      s->packed[a].type_index = kTVMFFIDLTensorPtr;
      s->packed[a].v_ptr = &m->vw[s->args[a]].t;
    }
  }
  int ni, no;
  if (fscanf(f, " inputs %d", &ni) != 1 || !read_ints(f, ni, &m->inputs) ||
      fscanf(f, " outputs %d", &no) != 1 || !read_ints(f, no, &m->outputs) || ni != m->ni ||
      no != m->no)
    return fail("bad inputs/outputs in", path);
  fclose(f);
  for (int i = 0; i < ni; ++i)  /* plan order: view indices; keep their storages */
    if (!in_range(m->inputs[i], m->nv)) return fail("bad inputs in", path);
  for (int i = 0; i < no; ++i)
    if (!in_range(m->outputs[i], m->nv)) return fail("bad outputs in", path);

  snprintf(path, sizeof path, "%s/weights.bin", dir);
  m->weights = weight_bytes ? (char*)read_file(path, weight_bytes) : NULL;
  if (weight_bytes && !m->weights) return fail("cannot read (or wrong size)", path);
  m->arena = (char*)alloc_aligned(arena_bytes);
  for (int i = 0; i < m->ns; ++i) {
    Storage* s = &m->st[i];
    if (s->kind == 'c') s->data = m->weights + s->where;
    if (s->kind == 't') s->data = m->arena + s->where;
    if (s->kind == 'i' || s->kind == 'o') s->data = alloc_aligned(s->nbytes);
  }
  for (int i = 0; i < m->nv; ++i) m->vw[i].t.data = m->st[m->vw[i].storage].data;
  return 0;
}

/* one run on the inputs already in place; step_ns (if given) accumulates each step's time */
static int run_steps(Model* m, int64_t* step_ns) {
  pool_start();
  for (int k = 0; k < m->nk; ++k) {
    Step* s = &m->steps[k];
    TVMFFIAny result;
    memset(&result, 0, sizeof result);
    int64_t t0 = step_ns ? now_ns() : 0;
    int rc = effc_kernels[s->kernel](NULL, s->packed, s->nargs, &result);
    if (step_ns) step_ns[k] += now_ns() - t0;
    if (rc != 0) {
      char step[600];
      snprintf(step, sizeof step, "%d (%s)", k, last_error);
      return fail("kernel failed at step", step);
    }
  }
  return 0;
}

static int64_t view_bytes(Model* m, int v) { return m->st[m->vw[v].storage].nbytes; }

#ifdef EFFC_AOT_LIBRARY
/* ---- in process: effc_aot_open / effc_aot_run / effc_aot_close (ctypes, backends/tvm_aot.py) */
const char* effc_aot_error(void) { return last_error; }

void* effc_aot_open(const char* dir) {
  Model* m = (Model*)calloc(1, sizeof(Model));
  if (load_plan(dir, m) != 0) {
    free(m);
    return NULL;
  }
  return m;
}

/* inputs and outputs in plan order, each a C-order buffer of the planned size */
int effc_aot_run(void* handle, void* const* inputs, void* const* outputs, int64_t* step_ns) {
  Model* m = (Model*)handle;
  RUN_LOCK();
  for (int i = 0; i < m->ni; ++i)
    memcpy(m->vw[m->inputs[i]].t.data, inputs[i], (size_t)view_bytes(m, m->inputs[i]));
  int rc = run_steps(m, step_ns);
  for (int i = 0; rc == 0 && i < m->no; ++i)
    memcpy(outputs[i], m->vw[m->outputs[i]].t.data, (size_t)view_bytes(m, m->outputs[i]));
  RUN_UNLOCK();
  return rc;
}

int effc_aot_num_steps(void* handle) { return ((Model*)handle)->nk; }

void effc_aot_close(void* handle) {
  Model* m = (Model*)handle;
  if (!m) return;
  for (int i = 0; i < m->ns; ++i)
    if (m->st[i].kind == 'i' || m->st[i].kind == 'o') free(m->st[i].data);
  for (int k = 0; k < m->nk; ++k) free(m->steps[k].args), free(m->steps[k].packed);
  free(m->steps), free(m->vw), free(m->st), free(m->inputs), free(m->outputs);
  free(m->weights), free(m->arena), free(m);
}
#else
/* ---- a command: files in, files out (wasm32 under a WASI runtime; a native check) ---- */
static int cmp_i64(const void* a, const void* b) {
  int64_t x = *(const int64_t*)a, y = *(const int64_t*)b;
  return (x > y) - (x < y);
}

static int report(int code) {
  if (code) fprintf(stderr, "effc-aot: %s\n", last_error);
  return code;
}

int main(int argc, char** argv) {
  if (argc < 3) return report(fail("usage: run_aot ARTIFACT_DIR IO_DIR [REPEAT]", NULL));
  int repeat = argc > 3 ? atoi(argv[3]) : 1;
  if (repeat < 1) repeat = 1;
  Model m;
  memset(&m, 0, sizeof m);
  if (load_plan(argv[1], &m) != 0) return report(2);
  char path[4096];
  for (int i = 0; i < m.ni; ++i) {
    snprintf(path, sizeof path, "%s/in%d.bin", argv[2], i);
    void* x = read_file(path, view_bytes(&m, m.inputs[i]));
    if (!x) return report(fail("cannot read (or wrong size)", path));
    memcpy(m.vw[m.inputs[i]].t.data, x, (size_t)view_bytes(&m, m.inputs[i]));
    free(x);
  }
  int profile = getenv("EFFC_AOT_PROFILE") && atoi(getenv("EFFC_AOT_PROFILE")) > 0;
  int64_t* step_ns = (int64_t*)calloc(m.nk + 1, sizeof(int64_t));
  int64_t* times = (int64_t*)calloc(repeat, sizeof(int64_t));
  for (int r = 0; r < repeat; ++r) {
    int64_t t0 = now_ns();
    if (run_steps(&m, profile ? step_ns : NULL) != 0) return report(2);
    times[r] = now_ns() - t0;
  }
  for (int i = 0; i < m.no; ++i) {
    View* v = &m.vw[m.outputs[i]];
    int64_t n = view_bytes(&m, m.outputs[i]);
    snprintf(path, sizeof path, "%s/out%d.bin", argv[2], i);
    FILE* o = fopen(path, "wb");
    if (!o || fwrite(v->t.data, 1, (size_t)n, o) != (size_t)n) return report(fail("cannot write", path));
    fclose(o);
  }
  if (profile)
    for (int k = 0; k < m.nk; ++k)
      fprintf(stderr, "effc-aot step %d kernel %d ns %lld\n", k, m.steps[k].kernel,
              (long long)(step_ns[k] / repeat));
  qsort(times, repeat, sizeof(int64_t), cmp_i64);
  printf("effc-aot runs=%d median_ns=%lld min_ns=%lld\n", repeat, (long long)times[repeat / 2],
         (long long)times[0]);
  return 0;
}
#endif
