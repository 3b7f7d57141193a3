// CUDA implementations of grad_dot and foreground_paste. Both are memory-bound: each thread owns a few
// consecutive pixels, loads them with 16-byte (or narrower aligned) vector loads that coalesce across
// the warp, accumulates in fp32 (fp64 for double inputs) and runs on the current stream.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAException.h>
#include <torch/library.h>

#include <cstdint>

#include "common.h"

namespace hybrid_accel {
namespace {

template <typename T, int N>
struct alignas(sizeof(T) * N) Vec {
  T v[N];
};

template <typename T>
__device__ __forceinline__ float to_acc(T v) { return static_cast<float>(v); }
__device__ __forceinline__ double to_acc(double v) { return v; }

template <typename acc_t>
__device__ __forceinline__ acc_t warp_sum(acc_t v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

constexpr int kThreads = 128;
constexpr int kRows = 4;    // most reference rows (r, c) handled per pass over the features
constexpr int kFStep = 4;   // feature rows loaded together: four independent 16-byte loads in flight per thread

// Four consecutive weights of one reference row; one 16-byte broadcast load when the row is aligned.
template <typename acc_t>
__device__ __forceinline__ void load_w4(const acc_t* __restrict__ w, bool vec, acc_t (&out)[kFStep]) {
#pragma unroll
  for (int i = 0; i < kFStep; ++i) out[i] = __ldg(w + i);
}
__device__ __forceinline__ void load_w4(const float* __restrict__ w, bool vec, float (&out)[kFStep]) {
  if (vec) {
    const float4 v = __ldg(reinterpret_cast<const float4*>(w));
    out[0] = v.x; out[1] = v.y; out[2] = v.z; out[3] = v.w;
  } else {
#pragma unroll
    for (int i = 0; i < kFStep; ++i) out[i] = __ldg(w + i);
  }
}

template <typename feat_t, typename acc_t, int VEC>
__device__ __forceinline__ void load_pixels(const feat_t* __restrict__ p, acc_t (&out)[VEC]) {
  if constexpr (VEC == 1) {
    out[0] = to_acc(*p);
  } else {
    const Vec<feat_t, VEC> x = *reinterpret_cast<const Vec<feat_t, VEC>*>(p);
#pragma unroll
    for (int v = 0; v < VEC; ++v) out[v] = to_acc(x.v[v]);
  }
}

// grid: x = pixel groups of kThreads * VEC, y = instance b; one launch per chunk of NJ reference rows.
// partial[b, blockIdx.x, j0 + j] = sum over the block's pixels of g[b, (j0+j) % C, p] * (W[j0+j] . h[b, :, p] + bias[j0+j]).
// The host guarantees P % VEC == 0 and 16-byte aligned rows when VEC > 1.
template <typename feat_t, typename grad_t, typename acc_t, int VEC, int NJ>
__global__ void __launch_bounds__(kThreads) grad_dot_kernel(const feat_t* __restrict__ h, const grad_t* __restrict__ g,
                                                            const acc_t* __restrict__ W, const acc_t* __restrict__ bias,
                                                            acc_t* __restrict__ partial, int64_t F, int64_t C,
                                                            int64_t RC, int64_t P, int64_t j0, bool wvec) {
  const int64_t b = blockIdx.y;
  const int64_t p0 = (static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x) * VEC;
  acc_t acc[NJ];
#pragma unroll
  for (int j = 0; j < NJ; ++j) acc[j] = 0;

  if (p0 < P) {
    acc_t u[NJ][VEC];
#pragma unroll
    for (int j = 0; j < NJ; ++j)
#pragma unroll
      for (int v = 0; v < VEC; ++v) u[j][v] = 0;
    const feat_t* hp = h + b * F * P + p0;
    const acc_t* Wj = W + j0 * F;
    int64_t f = 0;
    for (; f + kFStep <= F; f += kFStep) {
      acc_t hv[kFStep][VEC];
#pragma unroll
      for (int i = 0; i < kFStep; ++i) load_pixels<feat_t, acc_t, VEC>(hp + (f + i) * P, hv[i]);
#pragma unroll
      for (int j = 0; j < NJ; ++j) {
        // every thread of the warp reads the same weights: a broadcast served from the L1 cache
        acc_t w[kFStep];
        load_w4(Wj + j * F + f, wvec, w);
#pragma unroll
        for (int i = 0; i < kFStep; ++i)
#pragma unroll
          for (int v = 0; v < VEC; ++v) u[j][v] += w[i] * hv[i][v];
      }
    }
    for (; f < F; ++f) {  // F need not be a multiple of kFStep
      acc_t hv[VEC];
      load_pixels<feat_t, acc_t, VEC>(hp + f * P, hv);
#pragma unroll
      for (int j = 0; j < NJ; ++j) {
        const acc_t w = __ldg(Wj + j * F + f);
#pragma unroll
        for (int v = 0; v < VEC; ++v) u[j][v] += w * hv[v];
      }
    }
#pragma unroll
    for (int j = 0; j < NJ; ++j) {
      const int64_t jj = j0 + j;
      const grad_t* gp = g + (b * C + jj % C) * P + p0;
      const acc_t bj = bias ? bias[jj] : acc_t(0);
      acc_t gv[VEC];
      if constexpr (VEC * sizeof(grad_t) <= 16 && VEC > 1) {
        load_pixels<grad_t, acc_t, VEC>(gp, gv);  // aligned: grad rows hold P % VEC == 0 elements
      } else {
#pragma unroll
        for (int v = 0; v < VEC; ++v) gv[v] = to_acc(gp[v]);
      }
#pragma unroll
      for (int v = 0; v < VEC; ++v) acc[j] += gv[v] * (u[j][v] + bj);
    }
  }

  __shared__ acc_t red[kThreads / 32][NJ];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
#pragma unroll
  for (int j = 0; j < NJ; ++j) {
    const acc_t s = warp_sum(acc[j]);
    if (lane == 0) red[warp][j] = s;
  }
  __syncthreads();
  if (threadIdx.x < NJ) {
    acc_t s = 0;
#pragma unroll
    for (int w = 0; w < kThreads / 32; ++w) s += red[w][threadIdx.x];
    partial[(b * gridDim.x + blockIdx.x) * RC + j0 + threadIdx.x] = s;
  }
}

template <typename feat_t, typename grad_t, typename acc_t, int VEC>
void launch_rows(const dim3& grid, cudaStream_t stream, const feat_t* h, const grad_t* g, const acc_t* W,
                 const acc_t* bias, acc_t* partial, int64_t F, int64_t C, int64_t RC, int64_t P, bool wvec) {
  for (int64_t j0 = 0; j0 < RC; j0 += kRows) {
    switch (std::min<int64_t>(kRows, RC - j0)) {
#define HA_ROWS(NJ)                                                                                                 \
  case NJ:                                                                                                          \
    grad_dot_kernel<feat_t, grad_t, acc_t, VEC, NJ><<<grid, kThreads, 0, stream>>>(h, g, W, bias, partial, F, C, RC, \
                                                                                   P, j0, wvec);                    \
    break;
      HA_ROWS(1) HA_ROWS(2) HA_ROWS(3) HA_ROWS(4)
#undef HA_ROWS
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

template <typename feat_t, typename grad_t, typename acc_t>
void launch_grad_dot(const at::Tensor& h, const at::Tensor& g, const at::Tensor& W, const at::Tensor* bias,
                     at::Tensor& partial, int64_t nblk, int vec) {
  const int64_t B = h.size(0), F = h.size(1), P = h.size(2), C = g.size(1), RC = W.size(0) * W.size(1);
  const dim3 grid(static_cast<unsigned>(nblk), static_cast<unsigned>(B));
  auto stream = at::cuda::getCurrentCUDAStream();
  const acc_t* bp = bias ? bias->data_ptr<acc_t>() : nullptr;
  // 16-byte weight loads need every reference row 16-byte aligned
  const bool wvec = sizeof(acc_t) == 4 && F % 4 == 0 && reinterpret_cast<uintptr_t>(W.data_ptr()) % 16 == 0;
  constexpr int VMAX = 16 / sizeof(feat_t);
  if (vec == VMAX) {
    launch_rows<feat_t, grad_t, acc_t, VMAX>(grid, stream, h.data_ptr<feat_t>(), g.data_ptr<grad_t>(),
                                             W.data_ptr<acc_t>(), bp, partial.data_ptr<acc_t>(), F, C, RC, P, wvec);
  } else {
    launch_rows<feat_t, grad_t, acc_t, 1>(grid, stream, h.data_ptr<feat_t>(), g.data_ptr<grad_t>(),
                                          W.data_ptr<acc_t>(), bp, partial.data_ptr<acc_t>(), F, C, RC, P, wvec);
  }
}

at::Tensor grad_dot_cuda(const at::Tensor& feats, const at::Tensor& grad_logits, const at::Tensor& ref_weight,
                         const c10::optional<at::Tensor>& ref_bias) {
  check_grad_dot(feats, grad_logits, ref_weight, ref_bias);
  TORCH_CHECK(feats.is_cuda(), "grad_dot (CUDA kernel): `feats` must be a CUDA tensor");
  const c10::cuda::CUDAGuard guard(feats.device());
  const at::Tensor h = feats.contiguous();
  const at::Tensor g = grad_logits.contiguous();
  const at::Tensor W = ref_weight.contiguous();
  at::Tensor bias;
  if (ref_bias.has_value()) bias = ref_bias->contiguous();
  const int64_t B = h.size(0), P = h.size(2), R = W.size(0), C = W.size(1);
  const auto acc = acc_dtype(h.scalar_type());
  const int vmax = 16 / static_cast<int>(h.element_size());
  // 16-byte loads need every feature row to start on a 16-byte boundary
  const bool aligned = P % vmax == 0 && reinterpret_cast<uintptr_t>(h.data_ptr()) % 16 == 0 &&
                       reinterpret_cast<uintptr_t>(g.data_ptr()) % 16 == 0;
  const int vec = aligned ? vmax : 1;
  const int64_t nblk = std::max<int64_t>(1, (P + kThreads * vec - 1) / (kThreads * vec));
  at::Tensor partial = at::zeros({B, nblk, R, C}, h.options().dtype(acc));
  if (B == 0 || P == 0 || h.size(1) == 0) return partial.sum({1, 3});
  TORCH_CHECK(nblk < (1LL << 31) && B < 65536, "grad_dot: problem too large for one launch (B must be < 65536)");
  const at::Tensor* bp = ref_bias.has_value() ? &bias : nullptr;
  const auto ft = h.scalar_type(), gt = g.scalar_type();
  if (ft == at::kDouble) {
    launch_grad_dot<double, double, double>(h, g, W, bp, partial, nblk, vec);
  } else if (ft == at::kFloat) {
    launch_grad_dot<float, float, float>(h, g, W, bp, partial, nblk, vec);
  } else if (ft == at::kBFloat16) {
    if (gt == at::kFloat) launch_grad_dot<at::BFloat16, float, float>(h, g, W, bp, partial, nblk, vec);
    else launch_grad_dot<at::BFloat16, at::BFloat16, float>(h, g, W, bp, partial, nblk, vec);
  } else {
    if (gt == at::kFloat) launch_grad_dot<at::Half, float, float>(h, g, W, bp, partial, nblk, vec);
    else launch_grad_dot<at::Half, at::Half, float>(h, g, W, bp, partial, nblk, vec);
  }
  // fixed-order reduction (deterministic, unlike atomics)
  return partial.sum({1, 3});
}

// ------------------------------------------------------------------------------------ foreground_paste
template <typename acc_t>
__device__ __forceinline__ bool beats(acc_t v, acc_t best) { return v > best || (isnan(v) && !isnan(best)); }

// One thread per VEC consecutive pixels of one sample; only the source each pixel needs is read.
template <typename x_t, typename p_t, int VEC>
__global__ void foreground_paste_kernel(const x_t* __restrict__ xi, const x_t* __restrict__ xj,
                                        const int64_t* __restrict__ y, const int64_t* __restrict__ cls,
                                        const p_t* __restrict__ p1i, const p_t* __restrict__ p1j,
                                        const p_t* __restrict__ p2i, const p_t* __restrict__ p2j,
                                        x_t* __restrict__ xm, bool* __restrict__ mask, int64_t* __restrict__ y1,
                                        int64_t* __restrict__ y2, int64_t K, int64_t C, int64_t HW, int64_t groups) {
  const int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (t >= groups) return;
  const int64_t per = HW / VEC;  // VEC divides HW (checked on the host)
  const int64_t b = t / per;
  const int64_t q = (t % per) * VEC;
  const int64_t c_b = cls[b];
  const Vec<int64_t, VEC> yv = *reinterpret_cast<const Vec<int64_t, VEC>*>(y + b * HW + q);
  bool m[VEC];
  bool any_i = false, any_j = false;
#pragma unroll
  for (int v = 0; v < VEC; ++v) {
    m[v] = c_b >= 0 && yv.v[v] == c_b;
    any_i |= m[v];
    any_j |= !m[v];
  }
  Vec<bool, VEC> mv;
#pragma unroll
  for (int v = 0; v < VEC; ++v) mv.v[v] = m[v];
  *reinterpret_cast<Vec<bool, VEC>*>(mask + b * HW + q) = mv;

  for (int64_t k = 0; k < K; ++k) {
    const int64_t off = (b * K + k) * HW + q;
    Vec<x_t, VEC> a, c, o;
    if (any_i) a = *reinterpret_cast<const Vec<x_t, VEC>*>(xi + off);
    if (any_j) c = *reinterpret_cast<const Vec<x_t, VEC>*>(xj + off);
#pragma unroll
    for (int v = 0; v < VEC; ++v) o.v[v] = m[v] ? a.v[v] : c.v[v];
    *reinterpret_cast<Vec<x_t, VEC>*>(xm + off) = o;
  }

  const p_t* srcs[2][2] = {{p1i, p1j}, {p2i, p2j}};
  int64_t* outs[2] = {y1, y2};
#pragma unroll
  for (int net = 0; net < 2; ++net) {
    using pacc_t = decltype(to_acc(p_t()));
    pacc_t best[VEC];
    Vec<int64_t, VEC> arg;
    for (int64_t cc = 0; cc < C; ++cc) {
      const int64_t off = (b * C + cc) * HW + q;
      Vec<p_t, VEC> a, c;
      if (any_i) a = *reinterpret_cast<const Vec<p_t, VEC>*>(srcs[net][0] + off);
      if (any_j) c = *reinterpret_cast<const Vec<p_t, VEC>*>(srcs[net][1] + off);
#pragma unroll
      for (int v = 0; v < VEC; ++v) {
        const pacc_t val = to_acc(m[v] ? a.v[v] : c.v[v]);
        if (cc == 0 || beats(val, best[v])) {
          best[v] = val;
          arg.v[v] = cc;
        }
      }
    }
    *reinterpret_cast<Vec<int64_t, VEC>*>(outs[net] + b * HW + q) = arg;
  }
}

template <typename x_t, typename p_t>
void launch_paste(const at::Tensor& xi, const at::Tensor& xj, const at::Tensor& y, const at::Tensor& cls,
                  const at::Tensor& p1i, const at::Tensor& p1j, const at::Tensor& p2i, const at::Tensor& p2j,
                  at::Tensor& xm, at::Tensor& mask, at::Tensor& y1, at::Tensor& y2) {
  const int64_t B = xi.size(0), K = xi.size(1), HW = xi.size(2) * xi.size(3), C = p1i.size(1);
  auto stream = at::cuda::getCurrentCUDAStream();
  const int threads = 256;
#define HA_LAUNCH_PASTE(V)                                                                                          \
  {                                                                                                                 \
    const int64_t groups = B * (HW / V);                                                                            \
    const int64_t blocks = (groups + threads - 1) / threads;                                                        \
    foreground_paste_kernel<x_t, p_t, V><<<static_cast<unsigned>(blocks), threads, 0, stream>>>(                    \
        xi.data_ptr<x_t>(), xj.data_ptr<x_t>(), y.data_ptr<int64_t>(), cls.data_ptr<int64_t>(), p1i.data_ptr<p_t>(), \
        p1j.data_ptr<p_t>(), p2i.data_ptr<p_t>(), p2j.data_ptr<p_t>(), xm.data_ptr<x_t>(), mask.data_ptr<bool>(),   \
        y1.data_ptr<int64_t>(), y2.data_ptr<int64_t>(), K, C, HW, groups);                                          \
  }
  // four pixels per thread when every row of every plane stays aligned for the vector loads
  if (HW % 4 == 0) HA_LAUNCH_PASTE(4) else HA_LAUNCH_PASTE(1)
#undef HA_LAUNCH_PASTE
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> foreground_paste_cuda(
    const at::Tensor& x_i, const at::Tensor& x_j, const at::Tensor& y_i, const at::Tensor& cls, const at::Tensor& p1_i,
    const at::Tensor& p1_j, const at::Tensor& p2_i, const at::Tensor& p2_j) {
  check_foreground_paste(x_i, x_j, y_i, cls, p1_i, p1_j, p2_i, p2_j);
  TORCH_CHECK(x_i.is_cuda(), "foreground_paste (CUDA kernel): inputs must be CUDA tensors");
  const c10::cuda::CUDAGuard guard(x_i.device());
  // the vector loads need 32-byte aligned planes (int64 x 4); blocks from the caching allocator are
  auto cont = [](const at::Tensor& t) {
    if (!t.is_contiguous()) return t.contiguous();
    return reinterpret_cast<uintptr_t>(t.data_ptr()) % 32 == 0 ? t : t.clone();
  };
  const auto xi = cont(x_i), xj = cont(x_j), y = cont(y_i), c = cls.contiguous();
  const auto p1i = cont(p1_i), p1j = cont(p1_j), p2i = cont(p2_i), p2j = cont(p2_j);
  at::Tensor xm, mask, y1, y2;  // (no structured binding: C++17 lambdas cannot capture one)
  std::tie(xm, mask, y1, y2) = paste_outputs(xi);
  if (mask.numel() == 0) return {xm, mask, y1, y2};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, xi.scalar_type(), "foreground_paste_cuda_x", [&] {
    using x_t = scalar_t;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, p1i.scalar_type(), "foreground_paste_cuda_p", [&] {
      launch_paste<x_t, scalar_t>(xi, xj, y, c, p1i, p1j, p2i, p2j, xm, mask, y1, y2);
    });
  });
  return {xm, mask, y1, y2};
}

}  // namespace

TORCH_LIBRARY_IMPL(hybrid_accel, CUDA, m) {
  m.impl("grad_dot", &grad_dot_cuda);
  m.impl("foreground_paste", &foreground_paste_cuda);
}

}  // namespace hybrid_accel
