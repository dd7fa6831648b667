// effc's TVM host program: runs a relax VM executable (model.so) on raw inputs and writes its
// outputs, with no Python. Built natively or with a cross g++ (aarch64) against the TVM runtime
// and tvm-ffi libraries of that architecture; run under qemu-aarch64 here.
//
//   run_vm MODEL.so OUT_PREFIX IN0.bin CODE,BITS:d0,d1,... [IN1.bin CODE,BITS:dims ...]
//
// Inputs are raw little-endian values in C order, their DLPack type code (0 int, 1 uint,
// 2 float, 6 bool) and bits before the colon (2,32:1,3,224,224 is float32; a 0-d input has no
// dims after the colon). Each output i is written as OUT_PREFIX<i>.bin (raw values) and
// OUT_PREFIX<i>.shape ("CODE,BITS:dims").
#include <tvm/ffi/container/tensor.h>
#include <tvm/ffi/extra/module.h>
#include <tvm/ffi/function.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

using tvm::ffi::Tensor;

struct CPUAlloc {  // 64-byte aligned host memory, as TVM's kernels expect
  void AllocData(DLTensor* t) {
    size_t n = tvm::ffi::GetDataSize(*t);
    t->data = std::aligned_alloc(64, (n + 63) / 64 * 64);
  }
  void FreeData(DLTensor* t) { std::free(t->data); }
};

static std::vector<int64_t> parse_dims(const std::string& text) {
  std::vector<int64_t> dims;
  std::stringstream ss(text);
  std::string item;
  while (std::getline(ss, item, ',')) dims.push_back(std::stoll(item));
  return dims;
}

static size_t element_bytes(DLDataType t) { return (t.bits * t.lanes + 7) / 8; }

static void write_output(const Tensor& t, const std::string& prefix, int index) {
  size_t n = 1;
  DLDataType dt = t.dtype();
  std::string shape = std::to_string(dt.code) + "," + std::to_string(dt.bits) + ":";
  for (int i = 0; i < t.ndim(); ++i) {
    n *= static_cast<size_t>(t.shape()[i]);
    shape += (i ? "," : "") + std::to_string(t.shape()[i]);
  }
  std::ofstream(prefix + std::to_string(index) + ".bin", std::ios::binary)
      .write(static_cast<const char*>(t.data_ptr()), n * element_bytes(dt));
  std::ofstream(prefix + std::to_string(index) + ".shape") << shape << "\n";
}

int main(int argc, char** argv) {
  if (argc < 3 || (argc - 3) % 2) {
    std::fprintf(stderr, "usage: %s MODEL.so OUT_PREFIX [IN.bin CODE,BITS:d0,d1,...]...\n",
                 argv[0]);
    return 2;
  }
  tvm::ffi::Module lib = tvm::ffi::Module::LoadFromFile(argv[1]);
  tvm::ffi::Module vm = lib->GetFunction("vm_load_executable").value()().cast<tvm::ffi::Module>();
  // one CPU device, pooled allocator (kind 2), as TVM's Python VirtualMachine sets it up
  vm->GetFunction("vm_initialization").value()(static_cast<int>(kDLCPU), 0, 2);
  std::vector<tvm::ffi::Any> inputs;
  for (int i = 3; i < argc; i += 2) {
    std::string spec = argv[i + 1];
    size_t colon = spec.find(':');
    std::vector<int64_t> type = parse_dims(spec.substr(0, colon));
    if (colon == std::string::npos || type.size() != 2) {
      std::fprintf(stderr, "%s: expected CODE,BITS:dims\n", spec.c_str());
      return 2;
    }
    DLDataType dt{static_cast<uint8_t>(type[0]), static_cast<uint8_t>(type[1]), 1};
    std::vector<int64_t> dims = parse_dims(spec.substr(colon + 1));
    size_t n = 1;
    for (int64_t d : dims) n *= static_cast<size_t>(d);
    Tensor t = Tensor::FromNDAlloc(CPUAlloc(), tvm::ffi::Shape(dims), dt, DLDevice{kDLCPU, 0});
    std::ifstream in(argv[i], std::ios::binary);
    if (!in.read(static_cast<char*>(t.data_ptr()), n * element_bytes(dt))) {
      std::fprintf(stderr, "%s: cannot read %zu values\n", argv[i], n);
      return 2;
    }
    inputs.push_back(t);
  }
  std::vector<tvm::ffi::AnyView> views(inputs.begin(), inputs.end());
  tvm::ffi::Any result;
  tvm::ffi::Function main_fn = vm->GetFunction("main").value();
  main_fn.CallPacked(views.data(), static_cast<int32_t>(views.size()), &result);
  if (auto t = result.as<Tensor>()) {
    write_output(*t, argv[2], 0);
  } else {
    auto outs = result.cast<tvm::ffi::Array<tvm::ffi::Any>>();
    for (size_t i = 0; i < outs.size(); ++i) write_output(outs[i].cast<Tensor>(), argv[2], i);
  }
  return 0;
}
