// The MLX primitive behind every mlxgen CPU kernel (fast_math.cpp, quant.cpp): float32 output,
// the work run on the CPU stream's thread like MLX's own ops. Included inside each file's
// anonymous namespace, after `namespace mx = mlx::core;`.
#pragma once

// A Kernel sees the evaluated inputs (strides are only known then) and returns the task to run.
using Task = std::function<void()>;
using Kernel = std::function<Task(const std::vector<mx::array>&, float*)>;

class CpuKernel : public mx::Primitive {
 public:
  CpuKernel(mx::Stream s, const char* name, Kernel fn) : mx::Primitive(s), name_(name), fn_(std::move(fn)) {}
  void eval_cpu(const std::vector<mx::array>& in, std::vector<mx::array>& out) override {
    auto& y = out[0];
    y.set_data(mx::allocator::malloc(y.nbytes()));
    auto& enc = mx::cpu::get_command_encoder(stream());
    for (auto& a : in) enc.set_input_array(a);
    enc.set_output_array(y);
    enc.dispatch(fn_(in, y.data<float>()));
  }
  void eval_gpu(const std::vector<mx::array>&, std::vector<mx::array>&) override {
    throw std::runtime_error(std::string("mlxgen CPU kernel ") + name_ + " has no GPU version.");
  }
  const char* name() const override { return name_; }
  bool is_equivalent(const mx::Primitive&) const override { return false; }

 private:
  const char* name_;
  Kernel fn_;
};

mx::Stream cpu_stream() { return mx::default_stream(mx::Device::cpu); }
