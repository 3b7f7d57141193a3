// Schemas of the hybrid_accel ops and their CPU implementations (C++/OpenMP).
// The CUDA implementations live in cuda/ops_cuda.cu and register under the same schemas.
#include <Python.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "common.h"
#include "cpu/kernels.h"

// Importing hybrid_accel._C registers the ops below with the dispatcher; the module itself is empty.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef def = {PyModuleDef_HEAD_INIT, "_C", "hybrid_accel compiled ops", -1, nullptr};
  return PyModule_Create(&def);
}

namespace hybrid_accel {

namespace {

bool cpu_has_avx2() {
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
  static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return ok;
#else
  return false;
#endif
}

template <typename feat_t, typename grad_t, typename acc_t>
void run_grad_dot_cpu(const at::Tensor& h, const at::Tensor& g, const at::Tensor& W, const at::Tensor* bias,
                      at::Tensor& partial, int64_t block) {
  const int64_t B = h.size(0), F = h.size(1), P = h.size(2), C = g.size(1), RC = W.size(0) * W.size(1);
  auto fn = cpu_has_avx2() ? &cpu_avx2::grad_dot_partials<feat_t, grad_t, acc_t>
                           : &cpu_generic::grad_dot_partials<feat_t, grad_t, acc_t>;
  fn(h.data_ptr<feat_t>(), g.data_ptr<grad_t>(), W.data_ptr<acc_t>(), bias ? bias->data_ptr<acc_t>() : nullptr,
     partial.data_ptr<acc_t>(), B, F, C, RC, P, block, at::get_num_threads());
}

at::Tensor grad_dot_cpu(const at::Tensor& feats, const at::Tensor& grad_logits, const at::Tensor& ref_weight,
                        const c10::optional<at::Tensor>& ref_bias) {
  check_grad_dot(feats, grad_logits, ref_weight, ref_bias);
  TORCH_CHECK(feats.device().is_cpu(), "grad_dot (CPU kernel): `feats` must be on the CPU");
  // The kernel reads pixels contiguously; strided inputs are copied once here.
  const at::Tensor h = feats.contiguous();
  const at::Tensor g = grad_logits.contiguous();
  const at::Tensor W = ref_weight.contiguous();
  at::Tensor bias;
  if (ref_bias.has_value()) bias = ref_bias->contiguous();
  const int64_t B = h.size(0), P = h.size(2), R = W.size(0), C = W.size(1);
  // pixels per CPU task: u (R*C x block floats) stays in L1/L2 while every feature row streams through
  const int64_t block = 512;
  const int64_t nblk = std::max<int64_t>(1, (P + block - 1) / block);
  const auto acc = acc_dtype(h.scalar_type());
  at::Tensor partial = at::zeros({B, nblk, R, C}, h.options().dtype(acc));
  if (B == 0 || P == 0 || h.size(1) == 0) return partial.sum({1, 3});
  const at::Tensor* bp = ref_bias.has_value() ? &bias : nullptr;
  const auto ft = h.scalar_type(), gt = g.scalar_type();
  if (ft == at::kDouble) {
    run_grad_dot_cpu<double, double, double>(h, g, W, bp, partial, block);
  } else if (ft == at::kFloat) {
    run_grad_dot_cpu<float, float, float>(h, g, W, bp, partial, block);
  } else if (ft == at::kBFloat16) {
    if (gt == at::kFloat) run_grad_dot_cpu<c10::BFloat16, float, float>(h, g, W, bp, partial, block);
    else run_grad_dot_cpu<c10::BFloat16, c10::BFloat16, float>(h, g, W, bp, partial, block);
  } else {
    if (gt == at::kFloat) run_grad_dot_cpu<c10::Half, float, float>(h, g, W, bp, partial, block);
    else run_grad_dot_cpu<c10::Half, c10::Half, float>(h, g, W, bp, partial, block);
  }
  // Fixed-order reduction over pixel blocks and classes: the result does not depend on thread count.
  return partial.sum({1, 3});
}

template <typename T>
inline float as_float(T v) { return static_cast<float>(v); }
inline double as_float(double v) { return v; }

// torch.argmax semantics: NaN counts as the maximum, ties keep the first index.
template <typename acc_t>
inline bool beats(acc_t v, acc_t best) { return v > best || (std::isnan(v) && !std::isnan(best)); }

template <typename x_t, typename p_t>
void foreground_paste_cpu_impl(const at::Tensor& xi, const at::Tensor& xj, const at::Tensor& y, const at::Tensor& cls,
                               const at::Tensor& p1i, const at::Tensor& p1j, const at::Tensor& p2i,
                               const at::Tensor& p2j, at::Tensor& xm, at::Tensor& mask, at::Tensor& y1,
                               at::Tensor& y2) {
  const int64_t B = xi.size(0), K = xi.size(1), HW = xi.size(2) * xi.size(3), C = p1i.size(1);
  const x_t* xi_p = xi.data_ptr<x_t>();
  const x_t* xj_p = xj.data_ptr<x_t>();
  const int64_t* y_p = y.data_ptr<int64_t>();
  const int64_t* cls_p = cls.data_ptr<int64_t>();
  const p_t* pp[4] = {p1i.data_ptr<p_t>(), p1j.data_ptr<p_t>(), p2i.data_ptr<p_t>(), p2j.data_ptr<p_t>()};
  x_t* xm_p = xm.data_ptr<x_t>();
  bool* m_p = mask.data_ptr<bool>();
  int64_t* y1_p = y1.data_ptr<int64_t>();
  int64_t* y2_p = y2.data_ptr<int64_t>();
  const int64_t chunk = 4096;
  const int64_t nchunk = (HW + chunk - 1) / chunk;
  const int64_t ntask = B * nchunk;
  const int nthreads = at::get_num_threads();
#pragma omp parallel for schedule(static) num_threads(nthreads) if (ntask > 1)
  for (int64_t task = 0; task < ntask; ++task) {
    const int64_t b = task / nchunk;
    const int64_t q0 = (task % nchunk) * chunk, q1 = std::min(HW, q0 + chunk);
    const int64_t c_b = cls_p[b];
    for (int64_t q = q0; q < q1; ++q) {
      const bool m = c_b >= 0 && y_p[b * HW + q] == c_b;
      m_p[b * HW + q] = m;
      const x_t* src = m ? xi_p : xj_p;
      for (int64_t k = 0; k < K; ++k) xm_p[(b * K + k) * HW + q] = src[(b * K + k) * HW + q];
      for (int net = 0; net < 2; ++net) {
        const p_t* p = pp[2 * net + (m ? 0 : 1)] + b * C * HW + q;
        auto best = as_float(p[0]);
        int64_t arg = 0;
        for (int64_t c = 1; c < C; ++c) {
          const auto v = as_float(p[c * HW]);
          if (beats(v, best)) { best = v; arg = c; }
        }
        (net == 0 ? y1_p : y2_p)[b * HW + q] = arg;
      }
    }
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> foreground_paste_cpu(
    const at::Tensor& x_i, const at::Tensor& x_j, const at::Tensor& y_i, const at::Tensor& cls, const at::Tensor& p1_i,
    const at::Tensor& p1_j, const at::Tensor& p2_i, const at::Tensor& p2_j) {
  check_foreground_paste(x_i, x_j, y_i, cls, p1_i, p1_j, p2_i, p2_j);
  TORCH_CHECK(x_i.device().is_cpu(), "foreground_paste (CPU kernel): inputs must be on the CPU");
  const auto xi = x_i.contiguous(), xj = x_j.contiguous(), y = y_i.contiguous(), c = cls.contiguous();
  const auto p1i = p1_i.contiguous(), p1j = p1_j.contiguous(), p2i = p2_i.contiguous(), p2j = p2_j.contiguous();
  at::Tensor xm, mask, y1, y2;  // (no structured binding: C++17 lambdas cannot capture one)
  std::tie(xm, mask, y1, y2) = paste_outputs(xi);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, xi.scalar_type(), "foreground_paste_cpu_x", [&] {
    using x_t = scalar_t;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, p1i.scalar_type(), "foreground_paste_cpu_p", [&] {
      foreground_paste_cpu_impl<x_t, scalar_t>(xi, xj, y, c, p1i, p1j, p2i, p2j, xm, mask, y1, y2);
    });
  });
  return {xm, mask, y1, y2};
}

}  // namespace

TORCH_LIBRARY(hybrid_accel, m) {
  m.def("grad_dot(Tensor feats, Tensor grad_logits, Tensor ref_weight, Tensor? ref_bias) -> Tensor");
  m.def(
      "foreground_paste(Tensor x_i, Tensor x_j, Tensor y_i, Tensor cls, Tensor p1_i, Tensor p1_j, Tensor p2_i, "
      "Tensor p2_j) -> (Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(hybrid_accel, CPU, m) {
  m.impl("grad_dot", &grad_dot_cpu);
  m.impl("foreground_paste", &foreground_paste_cpu);
}

}  // namespace hybrid_accel
