// Schemas of the ptl_fused ops and their device-generic bodies (see bconv_cell.h).
// Autograd and fake kernels are registered from Python (ptl_fused/_cpp_ops.py).
#include "bconv_cell.h"

#include <ATen/autocast_mode.h>
#include <c10/core/impl/LocalDispatchKeySet.h>

namespace ptl_fused {

namespace {

at::ScalarType state_type(at::ScalarType compute) {
  return compute == at::kDouble ? at::kDouble : at::kFloat;
}

// Every tensor argument on x's device: the fused kernel reads them through raw pointers, so
// a CPU weight next to a CUDA x must fail here, not as an illegal address in the kernel.
void check_device(const char* name, const Tensor& t, const Tensor& x, const char* x_name = "x") {
  TORCH_CHECK(!t.defined() || t.device() == x.device(), "ptl_fused: ", name, " is on ", t.device(),
              ", ", x_name, " on ", x.device());
}

// Raw op callers get short checks; ptl_fused.ops validates with full messages first.
void check_cell_inputs(const Tensor& x, const Tensor& weight, const OptTensor& bias,
                       const Tensor& c_prev, int64_t in_factor, int64_t stride, int64_t padding) {
  TORCH_CHECK(x.dim() == 4, "ptl_fused: x must be 4-D (B, Cin, H, W), got ", x.sizes());
  TORCH_CHECK(weight.dim() == 4 && weight.size(0) % 4 == 0 && weight.size(2) == weight.size(3),
              "ptl_fused: weight must be (4*Cout, Cin, k, k), got ", weight.sizes());
  TORCH_CHECK(weight.size(1) == in_factor * x.size(1), "ptl_fused: weight has ", weight.size(1),
              " input channels, expected ", in_factor * x.size(1));
  TORCH_CHECK(at::isFloatingType(x.scalar_type()) && x.scalar_type() == weight.scalar_type(),
              "ptl_fused: x and weight must share a floating dtype, got ", x.scalar_type(), " and ",
              weight.scalar_type());
  TORCH_CHECK(!bias.has_value() || bias->sizes() == at::IntArrayRef{weight.size(0)},
              "ptl_fused: bias must be (4*Cout,)");
  TORCH_CHECK(stride >= 1 && padding >= 0, "ptl_fused: need stride >= 1 and padding >= 0");
  TORCH_CHECK(c_prev.scalar_type() == state_type(x.scalar_type()), "ptl_fused: c_prev must be ",
              state_type(x.scalar_type()), ", got ", c_prev.scalar_type());
  check_device("weight", weight, x);
  if (bias.has_value()) check_device("bias", *bias, x);
  check_device("c_prev", c_prev, x);
}

// (B, Cout, Ho, Wo) of the states and y for gates of shape (B, 4·Cout, Ho, Wo).
std::vector<int64_t> state_shape(at::IntArrayRef gate_shape) {
  return {gate_shape[0], gate_shape[1] / 4, gate_shape[2], gate_shape[3]};
}

// Allocates the outputs in layout `fmt` for gates of shape `gate_shape` (B, 4C, Ho, Wo);
// run_fwd then runs the epilogue, which overwrites the pre-activations in z with the
// activated gates, or the fused kernel, which writes the gates into z (either only where
// they are saved).
FwdEpilogueArgs fwd_outputs(at::IntArrayRef gate_shape, const at::TensorOptions& options,
                            const Tensor& c_prev, const Tensor& h_prev, const Tensor& h_alpha,
                            c10::MemoryFormat fmt) {
  const auto shape = state_shape(gate_shape);
  TORCH_CHECK(c_prev.sizes() == at::IntArrayRef(shape), "ptl_fused: c_prev must be ",
              at::IntArrayRef(shape), ", got ", c_prev.sizes());
  FwdEpilogueArgs a;
  a.channels_last = fmt == c10::MemoryFormat::ChannelsLast;
  a.c_prev = c_prev.contiguous(fmt);
  a.y = at::empty(shape, options.memory_format(fmt));
  a.c_new = at::empty(shape, c_prev.options().memory_format(fmt));
  if (h_prev.defined()) {
    TORCH_CHECK(h_prev.sizes() == at::IntArrayRef(shape), "ptl_fused: h_prev must be ",
                at::IntArrayRef(shape), ", got ", h_prev.sizes());
    TORCH_CHECK(h_prev.scalar_type() == c_prev.scalar_type(),
                "ptl_fused: h_prev must have c_prev's dtype");
    a.h_prev = h_prev.contiguous(fmt);
    a.h_alpha = h_alpha;
    a.h_new = at::empty(shape, h_prev.options().memory_format(fmt));
  }
  return a;
}

void check_fused(bool available, const Tensor& x) {
  TORCH_CHECK(available, "ptl_fused: fused_gemm=True (the implicit-GEMM forward) runs on CUDA ",
              "tensors only; x is on ", x.device());
}

// Gate tensor shape of a convolution of x with `weight` (no ATen call).
std::vector<int64_t> conv_out_shape(const Tensor& x, const Tensor& weight, int64_t stride,
                                    int64_t padding) {
  const auto k = weight.size(2);
  // Checked before dividing: C++ division truncates toward zero, so (n + 2p - k) / s + 1 would
  // be 1, not an error, for an input one pixel short of the kernel at stride 2.
  TORCH_CHECK(x.size(2) + 2 * padding >= k && x.size(3) + 2 * padding >= k, "ptl_fused: x ",
              x.sizes(), " is smaller than the kernel ", k, " with padding ", padding);
  auto out = [&](int64_t n) { return (n + 2 * padding - k) / stride + 1; };
  return {x.size(0), weight.size(0), out(x.size(2)), out(x.size(3))};
}

Tensor alpha_on(const Tensor& h_alpha, const Tensor& like) {
  TORCH_CHECK(h_alpha.numel() == 1, "ptl_fused: h_alpha must have one element, got ",
              h_alpha.sizes());
  // On the state's device, as every other input: a CPU scalar would cost a blocking copy in
  // each forward and backward, and break CUDA-graph capture.
  check_device("h_alpha", h_alpha, like, "c_prev");
  return h_alpha.to(like.device(), like.scalar_type()).reshape({1});
}

// Output padding of v2's recovery so that it gives back x's spatial size.
std::vector<int64_t> recovery_output_padding(const Tensor& x, int64_t k, int64_t stride,
                                             int64_t padding) {
  return {(x.size(2) + 2 * padding - k) % stride, (x.size(3) + 2 * padding - k) % stride};
}

}  // namespace

namespace {

// Z = conv(x (, x_rec)) and the cell: through ATen + epilogue, or the fused kernel.
FwdEpilogueArgs run_fwd(FwdEpilogue epilogue, FusedFwd fused, bool fused_gemm, bool save_gates,
                        const GemmArgs& g, const Tensor& c_prev, const Tensor& h_prev,
                        const Tensor& h_alpha) {
  const auto fmt = g.x.suggest_memory_format();
  if (fused_gemm) {
    check_fused(fused != nullptr, g.x);
    const auto shape = conv_out_shape(g.x, g.weight, g.stride, g.padding);
    auto a = fwd_outputs(shape, g.x.options(), c_prev, h_prev, h_alpha, fmt);
    a.save_gates = save_gates;
    // Unsaved gates never reach memory: the (B, 4·Cout, Ho, Wo) buffer is not allocated.
    if (save_gates) a.z = at::empty(shape, g.x.options().memory_format(fmt));
    if (a.y.numel() > 0) fused(g, a);
    return a;
  }
  const Tensor input = g.x_rec.defined() ? at::cat({g.x, g.x_rec}, 1) : g.x;
  const OptTensor bias = g.bias.defined() ? OptTensor(g.bias) : std::nullopt;
  Tensor z = at::convolution(input, g.weight, bias, {g.stride, g.stride}, {g.padding, g.padding},
                             {1, 1}, false, {0, 0}, 1)
                 .contiguous(fmt);
  auto a = fwd_outputs(z.sizes(), z.options(), c_prev, h_prev, h_alpha, fmt);
  a.z = z;
  a.save_gates = save_gates;
  if (z.numel() > 0) epilogue(a);
  return a;
}

// A bias for GemmArgs: the fused kernel indexes it densely (bias[q * Cout + n]).
Tensor defined_or_empty(const OptTensor& t) { return t.has_value() ? t->contiguous() : Tensor(); }

// The gates output: (0,) when the caller keeps none (backward recomputes them, or there is no
// backward), so autograd never holds the (B, 4·Cout, Ho, Wo) buffer.
Tensor gates_out(const FwdEpilogueArgs& a) {
  return a.save_gates ? a.z : at::empty({0}, a.y.options());
}

}  // namespace

std::tuple<Tensor, Tensor, Tensor> bconv_cell_fwd(FwdEpilogue epilogue, FusedFwd fused,
                                                  const Tensor& x, const Tensor& weight,
                                                  const OptTensor& bias, const Tensor& c_prev,
                                                  int64_t stride, int64_t padding, bool fused_gemm,
                                                  bool save_gates) {
  check_cell_inputs(x, weight, bias, c_prev, 1, stride, padding);
  const GemmArgs g{x, Tensor(), weight, defined_or_empty(bias), stride, padding};
  const auto a = run_fwd(epilogue, fused, fused_gemm, save_gates, g, c_prev, {}, {});
  return {a.y, a.c_new, gates_out(a)};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> bconv_cell_v2_fwd(
    FwdEpilogue epilogue, FusedFwd fused, const Tensor& x, const Tensor& weight,
    const OptTensor& bias, const Tensor& weight_rec, const OptTensor& bias_rec,
    const Tensor& c_prev, const Tensor& h_prev, const Tensor& h_alpha, int64_t stride,
    int64_t padding, bool fused_gemm, bool save_gates) {
  check_cell_inputs(x, weight, bias, c_prev, 2, stride, padding);
  const auto k = weight.size(3);
  TORCH_CHECK(weight_rec.dim() == 4 && weight_rec.size(0) == weight.size(0) / 4 &&
                  weight_rec.size(1) == x.size(1) && weight_rec.size(2) == k &&
                  weight_rec.size(3) == k,
              "ptl_fused: weight_rec must be (Cout, Cin, k, k), got ", weight_rec.sizes());
  check_device("weight_rec", weight_rec, x);
  if (bias_rec.has_value()) check_device("bias_rec", *bias_rec, x);
  check_device("h_prev", h_prev, x);
  const auto fmt = x.suggest_memory_format();
  Tensor x_rec = at::convolution(h_prev.to(x.scalar_type()), weight_rec, bias_rec, {stride, stride},
                                 {padding, padding}, {1, 1}, true,
                                 recovery_output_padding(x, k, stride, padding), 1)
                     .contiguous(fmt);
  const GemmArgs g{x, x_rec, weight, defined_or_empty(bias), stride, padding};
  const auto a = run_fwd(epilogue, fused, fused_gemm, save_gates, g, c_prev, h_prev,
                         alpha_on(h_alpha, c_prev));
  return {a.y, a.c_new, a.h_new, gates_out(a), x_rec};
}

Tensor bconv_cell_eval(EvalEpilogue epilogue, FusedEval fused, const Tensor& x,
                       const Tensor& weight3, const OptTensor& bias3, const OptTensor& gate_map,
                       int64_t stride, int64_t padding, bool fused_gemm) {
  TORCH_CHECK(x.dim() == 4, "ptl_fused: x must be 4-D (B, Cin, H, W), got ", x.sizes());
  TORCH_CHECK(weight3.dim() == 4 && weight3.size(0) % 3 == 0 && weight3.size(1) == x.size(1) &&
                  weight3.size(2) == weight3.size(3),
              "ptl_fused: the eval weight must be (3*Cout, Cin, k, k) with square k (gates i, o, "
              "g), got ",
              weight3.sizes());
  TORCH_CHECK(at::isFloatingType(x.scalar_type()) && x.scalar_type() == weight3.scalar_type(),
              "ptl_fused: x and weight must share a floating dtype");
  TORCH_CHECK(stride >= 1 && padding >= 0, "ptl_fused: need stride >= 1 and padding >= 0");
  TORCH_CHECK(!bias3.has_value() || bias3->sizes() == at::IntArrayRef{weight3.size(0)},
              "ptl_fused: the eval bias must be (3*Cout,), got ", bias3->sizes());
  check_device("weight", weight3, x);
  if (bias3.has_value()) check_device("bias", *bias3, x);
  const auto fmt = x.suggest_memory_format();
  check_fused(fused != nullptr || !fused_gemm, x);
  // The fused kernel computes z in registers; the ATen path materialises it.
  const Tensor z = fused_gemm ? Tensor()
                              : at::convolution(x, weight3, bias3, {stride, stride},
                                                {padding, padding}, {1, 1}, false, {0, 0}, 1)
                                    .contiguous(fmt);
  const auto zshape = conv_out_shape(x, weight3, stride, padding);
  EvalEpilogueArgs a;
  a.channels_last = fmt == c10::MemoryFormat::ChannelsLast;
  a.z = z;
  if (gate_map.has_value()) {
    const auto map_shape = at::IntArrayRef(zshape).slice(1);
    TORCH_CHECK(gate_map->sizes() == map_shape,
                "ptl_fused: gate_map must be (3*Cout, Ho, Wo) = ", map_shape, ", got ",
                gate_map->sizes());
    check_device("gate_map", *gate_map, x);
    const Tensor m = gate_map->to(x.scalar_type());
    // The map follows z's layout without the batch: (3C, Ho, Wo), or (Ho, Wo, 3C) for NHWC.
    a.gate_map = a.channels_last ? m.permute({1, 2, 0}).contiguous() : m.contiguous();
  }
  a.y = at::empty({zshape[0], zshape[1] / 3, zshape[2], zshape[3]}, x.options().memory_format(fmt));
  if (a.y.numel() == 0) return a.y;
  if (fused_gemm) {
    fused({x, Tensor(), weight3, defined_or_empty(bias3), stride, padding}, a);
  } else {
    epilogue(a);
  }
  return a.y;
}

namespace {

std::tuple<Tensor, Tensor, Tensor> run_bwd_epilogue(BwdEpilogue epilogue, const OptTensor& grad_y,
                                                    const OptTensor& grad_c_new,
                                                    const OptTensor& grad_h_new,
                                                    const Tensor& c_prev, const Tensor& gates,
                                                    const Tensor& h_alpha) {
  const auto fmt = gates.suggest_memory_format();
  // A zero-sized or ambiguous layout falls back to NCHW for every tensor alike.
  const bool cl = fmt == c10::MemoryFormat::ChannelsLast;
  const auto state_opts = c_prev.options();
  auto in = [&](const OptTensor& t, at::ScalarType dtype) {
    return t.has_value() && t->defined() ? t->to(dtype).contiguous(fmt) : Tensor();
  };
  // The kernel indexes every tensor by c_prev's element count and the gates' layout: a shape
  // that disagrees would read and write past the ends of the buffers.
  TORCH_CHECK(gates.dim() == 4 && gates.size(1) % 4 == 0 && at::isFloatingType(gates.scalar_type()),
              "ptl_fused: gates must be a floating (B, 4*Cout, Ho, Wo) tensor, got ",
              gates.scalar_type(), " ", gates.sizes());
  const auto shape = state_shape(gates.sizes());
  TORCH_CHECK(c_prev.sizes() == at::IntArrayRef(shape), "ptl_fused: c_prev must be ",
              at::IntArrayRef(shape), " for gates of shape ", gates.sizes(), ", got ",
              c_prev.sizes());
  TORCH_CHECK(c_prev.scalar_type() == state_type(gates.scalar_type()), "ptl_fused: c_prev must be ",
              state_type(gates.scalar_type()), ", got ", c_prev.scalar_type());
  check_device("c_prev", c_prev, gates, "gates");
  for (const auto& [name, t] :
       {std::pair{"grad_y", &grad_y}, {"grad_c_new", &grad_c_new}, {"grad_h_new", &grad_h_new}}) {
    if (!t->has_value() || !(*t)->defined()) continue;
    check_device(name, **t, gates, "gates");
    TORCH_CHECK((*t)->sizes() == at::IntArrayRef(shape), "ptl_fused: ", name, " must be ",
                at::IntArrayRef(shape), ", got ", (*t)->sizes());
  }
  BwdEpilogueArgs a;
  a.channels_last = cl;
  a.gates = gates.contiguous(fmt);
  a.c_prev = c_prev.contiguous(fmt);
  a.grad_y = in(grad_y, gates.scalar_type());
  a.grad_c_new = in(grad_c_new, c_prev.scalar_type());
  a.grad_z = at::empty_like(a.gates, gates.options().memory_format(fmt));
  a.grad_c_prev = at::empty(c_prev.sizes(), state_opts.memory_format(fmt));
  if (h_alpha.defined()) {
    a.grad_h_new = in(grad_h_new, c_prev.scalar_type());
    a.h_alpha = alpha_on(h_alpha, c_prev);
    a.grad_h_prev = at::empty(c_prev.sizes(), state_opts.memory_format(fmt));
  }
  if (gates.numel() > 0) epilogue(a);
  return {a.grad_z, a.grad_c_prev, a.grad_h_prev};
}

}  // namespace

std::tuple<Tensor, Tensor> bconv_cell_bwd(BwdEpilogue epilogue, const OptTensor& grad_y,
                                          const OptTensor& grad_c_new, const Tensor& c_prev,
                                          const Tensor& gates) {
  auto [gz, gc, unused] = run_bwd_epilogue(epilogue, grad_y, grad_c_new, {}, c_prev, gates, {});
  return {gz, gc};
}

std::tuple<Tensor, Tensor, Tensor> bconv_cell_v2_bwd(BwdEpilogue epilogue, const OptTensor& grad_y,
                                                     const OptTensor& grad_c_new,
                                                     const OptTensor& grad_h_new,
                                                     const Tensor& c_prev, const Tensor& gates,
                                                     const Tensor& h_alpha) {
  return run_bwd_epilogue(epilogue, grad_y, grad_c_new, grad_h_new, c_prev, gates, h_alpha);
}

// Autocast: the gate and recovery convolutions run in the autocast dtype; the states stay
// in float32 (DESIGN.md §1), so only x, the weights and the biases are cast.
namespace {

template <c10::DeviceType D>
struct Autocast {
  static constexpr auto key =
      D == c10::DeviceType::CUDA ? c10::DispatchKey::AutocastCUDA : c10::DispatchKey::AutocastCPU;
  static Tensor cast(const Tensor& t) {
    return at::autocast::cached_cast(at::autocast::get_autocast_dtype(D), t, D);
  }
  static OptTensor cast(const OptTensor& t) { return t.has_value() ? OptTensor(cast(*t)) : t; }

  static std::tuple<Tensor, Tensor, Tensor> fwd(const Tensor& x, const Tensor& w,
                                                const OptTensor& b, const Tensor& c_prev,
                                                int64_t stride, int64_t padding, bool fused_gemm,
                                                bool save_gates) {
    c10::impl::ExcludeDispatchKeyGuard no_autocast(key);
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("ptl_fused::bconv_cell_fwd", "")
                         .typed<decltype(fwd)>();
    return op.call(cast(x), cast(w), cast(b), c_prev, stride, padding, fused_gemm, save_gates);
  }

  static std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> v2_fwd(
      const Tensor& x, const Tensor& w, const OptTensor& b, const Tensor& w_rec,
      const OptTensor& b_rec, const Tensor& c_prev, const Tensor& h_prev, const Tensor& h_alpha,
      int64_t stride, int64_t padding, bool fused_gemm, bool save_gates) {
    c10::impl::ExcludeDispatchKeyGuard no_autocast(key);
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("ptl_fused::bconv_cell_v2_fwd", "")
                         .typed<decltype(v2_fwd)>();
    return op.call(cast(x), cast(w), cast(b), cast(w_rec), cast(b_rec), c_prev, h_prev, h_alpha,
                   stride, padding, fused_gemm, save_gates);
  }

  static Tensor eval(const Tensor& x, const Tensor& w3, const OptTensor& b3,
                     const OptTensor& gate_map, int64_t stride, int64_t padding, bool fused_gemm) {
    c10::impl::ExcludeDispatchKeyGuard no_autocast(key);
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("ptl_fused::bconv_cell_eval", "")
                         .typed<decltype(eval)>();
    return op.call(cast(x), cast(w3), cast(b3), cast(gate_map), stride, padding, fused_gemm);
  }
};

}  // namespace

TORCH_LIBRARY(ptl_fused, m) {
  m.def(
      "bconv_cell_fwd(Tensor x, Tensor weight, Tensor? bias, Tensor c_prev, int stride, "
      "int padding, bool fused_gemm=False, bool save_gates=True) -> "
      "(Tensor y, Tensor c_new, Tensor gates)");
  m.def(
      "bconv_cell_bwd(Tensor? grad_y, Tensor? grad_c_new, Tensor c_prev, Tensor gates) -> "
      "(Tensor grad_z, Tensor grad_c_prev)");
  m.def(
      "bconv_cell_v2_fwd(Tensor x, Tensor weight, Tensor? bias, Tensor weight_rec, "
      "Tensor? bias_rec, Tensor c_prev, Tensor h_prev, Tensor h_alpha, int stride, "
      "int padding, bool fused_gemm=False, bool save_gates=True) -> "
      "(Tensor y, Tensor c_new, Tensor h_new, Tensor gates, Tensor x_rec)");
  m.def(
      "bconv_cell_v2_bwd(Tensor? grad_y, Tensor? grad_c_new, Tensor? grad_h_new, "
      "Tensor c_prev, Tensor gates, Tensor h_alpha) -> "
      "(Tensor grad_z, Tensor grad_c_prev, Tensor grad_h_prev)");
  // Inference from the zero state (no autograd; ptl_fused.ops routes grad-requiring calls to
  // the full op): weight3/bias3 are the i, o, g rows, gate_map v2's constant share.
  m.def(
      "bconv_cell_eval(Tensor x, Tensor weight3, Tensor? bias3, Tensor? gate_map, int stride, "
      "int padding, bool fused_gemm=False) -> Tensor y");
}

TORCH_LIBRARY_IMPL(ptl_fused, AutocastCPU, m) {
  using A = Autocast<c10::DeviceType::CPU>;
  m.impl("bconv_cell_fwd", TORCH_FN(A::fwd));
  m.impl("bconv_cell_v2_fwd", TORCH_FN(A::v2_fwd));
  m.impl("bconv_cell_eval", TORCH_FN(A::eval));
}

TORCH_LIBRARY_IMPL(ptl_fused, AutocastCUDA, m) {
  using A = Autocast<c10::DeviceType::CUDA>;
  m.impl("bconv_cell_fwd", TORCH_FN(A::fwd));
  m.impl("bconv_cell_v2_fwd", TORCH_FN(A::v2_fwd));
  m.impl("bconv_cell_eval", TORCH_FN(A::eval));
}

}  // namespace ptl_fused
