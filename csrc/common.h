// Shared argument checks for the CPU and CUDA implementations of the hybrid_accel ops.
#pragma once

#include <torch/library.h>
#include <ATen/ATen.h>

#include <string>
#include <tuple>

namespace hybrid_accel {

inline bool is_float_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kBFloat16 || t == at::kHalf || t == at::kDouble;
}

// Accumulation dtype: float64 for float64 inputs, float32 for everything else.
inline at::ScalarType acc_dtype(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

// Error messages are assembled as one std::string (std::to_string, no std::ostream): streaming numbers
// from an extension's own copy of the ostream templates crashed where the compiler's libstdc++ headers
// and the libstdc++ loaded at run time differ (seen with torch 2.11 wheels and a newer system g++).
inline std::string dims(const at::Tensor& t) {
  std::string s = "[";
  for (int64_t i = 0; i < t.dim(); ++i) {
    if (i) s += ", ";
    s += std::to_string(t.size(i));
  }
  return s + "]";
}
inline std::string dtype_name(at::ScalarType t) { return std::string(c10::toString(t)); }
inline std::string num(int64_t v) { return std::to_string(v); }

#define HA_CHECK(cond, msg) TORCH_CHECK((cond), std::string(msg))

// grad_dot(feats [B,F,P], grad_logits [B,C,P], ref_weight [R,C,F], ref_bias [R,C]?) -> [B,R]
inline void check_grad_dot(const at::Tensor& feats, const at::Tensor& grad, const at::Tensor& W,
                           const c10::optional<at::Tensor>& bias) {
  HA_CHECK(feats.dim() == 3, "grad_dot: `feats` must be [B, F, P], got " + dims(feats));
  HA_CHECK(grad.dim() == 3, "grad_dot: `grad_logits` must be [B, C, P], got " + dims(grad));
  HA_CHECK(W.dim() == 3, "grad_dot: `ref_weight` must be [R, C, F], got " + dims(W));
  const auto ft = feats.scalar_type(), acc = acc_dtype(ft);
  HA_CHECK(is_float_dtype(ft), "grad_dot: `feats` must be a floating tensor, got " + dtype_name(ft));
  HA_CHECK(grad.scalar_type() == ft || grad.scalar_type() == acc,
           "grad_dot: `grad_logits` dtype " + dtype_name(grad.scalar_type()) + " must equal `feats` dtype " +
               dtype_name(ft) + " or be " + dtype_name(acc));
  HA_CHECK(W.scalar_type() == acc, "grad_dot: `ref_weight` must be " + dtype_name(acc) + " for `feats` of dtype " +
                                       dtype_name(ft) + ", got " + dtype_name(W.scalar_type()));
  HA_CHECK(grad.size(0) == feats.size(0) && grad.size(2) == feats.size(2),
           "grad_dot: `grad_logits` " + dims(grad) + " must be [B, C, P] with B and P of `feats` " + dims(feats));
  HA_CHECK(W.size(1) == grad.size(1) && W.size(2) == feats.size(1),
           "grad_dot: `ref_weight` " + dims(W) + " must be [R, C, F] with C of `grad_logits` " + dims(grad) +
               " and F of `feats` " + dims(feats));
  HA_CHECK(grad.device() == feats.device() && W.device() == feats.device(),
           "grad_dot: `feats`, `grad_logits` and `ref_weight` must be on one device");
  if (bias.has_value()) {
    const auto& b = *bias;
    HA_CHECK(b.dim() == 2 && b.size(0) == W.size(0) && b.size(1) == W.size(1),
             "grad_dot: `ref_bias` must be [R, C] = [" + num(W.size(0)) + ", " + num(W.size(1)) + "], got " + dims(b));
    HA_CHECK(b.scalar_type() == W.scalar_type(), "grad_dot: `ref_bias` dtype must equal `ref_weight` dtype");
    HA_CHECK(b.device() == feats.device(), "grad_dot: `ref_bias` must be on the device of `feats`");
  }
}

inline void check_foreground_paste(const at::Tensor& x_i, const at::Tensor& x_j, const at::Tensor& y_i,
                                   const at::Tensor& cls, const at::Tensor& p1_i, const at::Tensor& p1_j,
                                   const at::Tensor& p2_i, const at::Tensor& p2_j) {
  HA_CHECK(x_i.dim() == 4, "foreground_paste: `x_i` must be [B, K, H, W], got " + dims(x_i));
  HA_CHECK(x_j.sizes() == x_i.sizes(), "foreground_paste: `x_j` " + dims(x_j) + " must match `x_i` " + dims(x_i));
  HA_CHECK(is_float_dtype(x_i.scalar_type()) && x_j.scalar_type() == x_i.scalar_type(),
           "foreground_paste: `x_i` and `x_j` must share one floating dtype");
  const auto B = x_i.size(0), H = x_i.size(2), W = x_i.size(3);
  const std::string bhw = "[" + num(B) + ", " + num(H) + ", " + num(W) + "]";
  HA_CHECK(y_i.dim() == 3 && y_i.size(0) == B && y_i.size(1) == H && y_i.size(2) == W,
           "foreground_paste: `y_i` must be [B, H, W] = " + bhw + ", got " + dims(y_i));
  HA_CHECK(y_i.scalar_type() == at::kLong, "foreground_paste: `y_i` must be int64, got " + dtype_name(y_i.scalar_type()));
  HA_CHECK(cls.dim() == 1 && cls.size(0) == B,
           "foreground_paste: `cls` must be [B] = [" + num(B) + "], got " + dims(cls));
  HA_CHECK(cls.scalar_type() == at::kLong, "foreground_paste: `cls` must be int64, got " + dtype_name(cls.scalar_type()));
  const at::Tensor* ps[4] = {&p1_i, &p1_j, &p2_i, &p2_j};
  const char* names[4] = {"p1_i", "p1_j", "p2_i", "p2_j"};
  for (int i = 0; i < 4; ++i) {
    const auto& p = *ps[i];
    const std::string name = names[i];
    HA_CHECK(p.dim() == 4 && p.size(0) == B && p.size(1) == p1_i.size(1) && p.size(2) == H && p.size(3) == W,
             "foreground_paste: `" + name + "` must be [B, C, H, W] like `p1_i` " + dims(p1_i) + ", got " + dims(p));
    HA_CHECK(is_float_dtype(p.scalar_type()) && p.scalar_type() == p1_i.scalar_type(),
             "foreground_paste: `" + name + "` must be floating with the dtype of `p1_i`");
    HA_CHECK(p.device() == x_i.device(), "foreground_paste: `" + name + "` must be on the device of `x_i`");
  }
  HA_CHECK(p1_i.size(1) >= 1, "foreground_paste: predictions need at least one class");
  HA_CHECK(x_j.device() == x_i.device() && y_i.device() == x_i.device() && cls.device() == x_i.device(),
           "foreground_paste: all inputs must be on one device");
}

// Outputs of foreground_paste for contiguous inputs x_i [B, K, H, W]: x_m, mask, y1_m, y2_m.
inline std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> paste_outputs(const at::Tensor& xi) {
  const int64_t B = xi.size(0), H = xi.size(2), W = xi.size(3);
  return {at::empty_like(xi, at::MemoryFormat::Contiguous), at::empty({B, H, W}, xi.options().dtype(at::kBool)),
          at::empty({B, H, W}, xi.options().dtype(at::kLong)), at::empty({B, H, W}, xi.options().dtype(at::kLong))};
}

}  // namespace hybrid_accel
