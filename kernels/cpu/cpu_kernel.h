// The MLX primitive behind every mlxgen CPU kernel (fast_math.cpp, quant.cpp, decode_layer.cpp),
// the work run on the CPU stream's thread like MLX's own ops. Included inside each file's
// anonymous namespace, after `namespace mx = mlx::core;`.
#pragma once

// A Kernel sees the evaluated inputs (strides are only known then) and returns the task to run.
using Task = std::function<void()>;
using Kernel = std::function<Task(const std::vector<mx::array>&, float*)>;

// src's elements in row-major order into dst (allocated, same shape): any strides, any dtype.
inline void dense_copy(const mx::array& src, mx::array& dst) {
  const int nd = src.ndim();
  const size_t item = src.itemsize();
  const int64_t inner = nd ? src.shape(-1) : 1, inner_stride = nd ? src.strides()[nd - 1] : 1;
  const char* s = src.data<char>();
  char* d = dst.data<char>();
  std::vector<int> idx(std::max(nd - 1, 0), 0);
  for (size_t row = 0, rows = inner ? src.size() / inner : 0; row < rows; ++row) {
    int64_t off = 0;
    for (int a = 0; a < nd - 1; ++a) off += idx[a] * src.strides()[a];
    for (int64_t i = 0; i < inner; ++i, d += item) std::memcpy(d, s + (off + i * inner_stride) * item, item);
    for (int a = nd - 2; a >= 0 && ++idx[a] == src.shape(a); --a) idx[a] = 0;
  }
}

// Row-contiguous versions of `in` (except those in `strided`): copies are allocated here and
// filled by the returned step, which the task runs first.
inline std::function<void()> dense_inputs(const std::vector<mx::array>& in, uint32_t strided,
                                          std::vector<mx::array>& args) {
  args = in;
  std::vector<std::pair<mx::array, mx::array>> copies;  // (input, its dense copy)
  for (size_t i = 0; i < in.size(); ++i) {
    if ((strided >> i & 1) || in[i].flags().row_contiguous) continue;
    mx::array dense(in[i].shape(), in[i].dtype(), nullptr, {});
    dense.set_data(mx::allocator::malloc(dense.nbytes()));
    copies.emplace_back(in[i], dense);
    args[i] = dense;
  }
  if (copies.empty()) return {};
  return [copies = std::move(copies)]() mutable {
    for (auto& [src, dst] : copies) dense_copy(src, dst);
  };
}

// Inputs are handed to the kernel row-contiguous, except those in `strided` (bit i: input i is
// read with its own strides). The layout is only known at eval time, where a copy is rarely
// needed; a Contiguous node per input at graph time would cost a graph node every call.
// Kernel: one float32 output; Kernels: any outputs (each allocated with its own shape and dtype).
using Kernels = std::function<Task(const std::vector<mx::array>&, std::vector<mx::array>&)>;

class CpuKernel : public mx::Primitive {
 public:
  CpuKernel(mx::Stream s, const char* name, Kernel fn, uint32_t strided = 0)
      : mx::Primitive(s), name_(name), strided_(strided),
        fn_([fn = std::move(fn)](const std::vector<mx::array>& in, std::vector<mx::array>& out) {
          return fn(in, out[0].data<float>());
        }) {}
  CpuKernel(mx::Stream s, const char* name, Kernels fn, uint32_t strided = 0)
      : mx::Primitive(s), name_(name), strided_(strided), fn_(std::move(fn)) {}
  void eval_cpu(const std::vector<mx::array>& in, std::vector<mx::array>& out) override {
    for (auto& y : out) y.set_data(mx::allocator::malloc(y.nbytes()));
    auto& enc = mx::cpu::get_command_encoder(stream());
    std::vector<mx::array> args;
    auto densify = dense_inputs(in, strided_, args);
    for (auto& a : in) enc.set_input_array(a);
    for (auto& y : out) enc.set_output_array(y);
    Task task = fn_(args, out);
    if (!densify) return enc.dispatch(std::move(task));
    enc.dispatch([densify = std::move(densify), task = std::move(task)]() mutable {
      densify();
      task();
    });
  }
  void eval_gpu(const std::vector<mx::array>&, std::vector<mx::array>&) override {
    throw std::runtime_error(std::string("mlxgen CPU kernel ") + name_ + " has no GPU version.");
  }
  const char* name() const override { return name_; }
  bool is_equivalent(const mx::Primitive&) const override { return false; }

 private:
  const char* name_;
  uint32_t strided_;
  Kernels fn_;
};

mx::Stream cpu_stream() { return mx::default_stream(mx::Device::cpu); }
