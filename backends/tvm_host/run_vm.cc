// effc's TVM host program: runs a relax VM executable (model.so) on raw float32 inputs and
// writes its outputs, with no Python. Built natively or with a cross g++ (aarch64) against the
// TVM runtime and tvm-ffi libraries of that architecture; run under qemu-aarch64 here.
//
//   run_vm MODEL.so OUT_PREFIX IN0.bin d0,d1,... [IN1.bin dims ...]
//
// Inputs are raw little-endian float32 in C order. Each output i is written as
// OUT_PREFIX<i>.bin (raw float32) and OUT_PREFIX<i>.shape (dims, comma separated).
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

static void write_output(const Tensor& t, const std::string& prefix, int index) {
  size_t n = 1;
  std::string shape;
  for (int i = 0; i < t.ndim(); ++i) {
    n *= static_cast<size_t>(t.shape()[i]);
    shape += (i ? "," : "") + std::to_string(t.shape()[i]);
  }
  std::ofstream(prefix + std::to_string(index) + ".bin", std::ios::binary)
      .write(static_cast<const char*>(t.data_ptr()), n * sizeof(float));
  std::ofstream(prefix + std::to_string(index) + ".shape") << shape << "\n";
}

int main(int argc, char** argv) {
  if (argc < 3 || (argc - 3) % 2) {
    std::fprintf(stderr, "usage: %s MODEL.so OUT_PREFIX [IN.bin d0,d1,...]...\n", argv[0]);
    return 2;
  }
  tvm::ffi::Module lib = tvm::ffi::Module::LoadFromFile(argv[1]);
  tvm::ffi::Module vm = lib->GetFunction("vm_load_executable").value()().cast<tvm::ffi::Module>();
  // one CPU device, pooled allocator (kind 2), as TVM's Python VirtualMachine sets it up
  vm->GetFunction("vm_initialization").value()(static_cast<int>(kDLCPU), 0, 2);
  std::vector<tvm::ffi::Any> inputs;
  for (int i = 3; i < argc; i += 2) {
    std::vector<int64_t> dims = parse_dims(argv[i + 1]);
    size_t n = 1;
    for (int64_t d : dims) n *= static_cast<size_t>(d);
    std::vector<float> buf(n);
    std::ifstream in(argv[i], std::ios::binary);
    if (!in.read(reinterpret_cast<char*>(buf.data()), n * sizeof(float))) {
      std::fprintf(stderr, "%s: cannot read %zu float32 values\n", argv[i], n);
      return 2;
    }
    Tensor t = Tensor::FromNDAlloc(CPUAlloc(), tvm::ffi::Shape(dims), DLDataType{kDLFloat, 32, 1},
                                   DLDevice{kDLCPU, 0});
    std::memcpy(t.data_ptr(), buf.data(), n * sizeof(float));
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
