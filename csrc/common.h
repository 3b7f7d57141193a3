// Shared argument checks for the CPU and CUDA implementations of the hybrid_accel ops.
#pragma once

#include <torch/library.h>
#include <ATen/ATen.h>

namespace hybrid_accel {

inline bool is_float_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kBFloat16 || t == at::kHalf || t == at::kDouble;
}

// Accumulation dtype: float64 for float64 inputs, float32 for everything else.
inline at::ScalarType acc_dtype(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

// grad_dot(feats [B,F,P], grad_logits [B,C,P], ref_weight [R,C,F], ref_bias [R,C]?) -> [B,R]
inline void check_grad_dot(const at::Tensor& feats, const at::Tensor& grad, const at::Tensor& W,
                           const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(feats.dim() == 3, "grad_dot: `feats` must be [B, F, P], got ", feats.sizes());
  TORCH_CHECK(grad.dim() == 3, "grad_dot: `grad_logits` must be [B, C, P], got ", grad.sizes());
  TORCH_CHECK(W.dim() == 3, "grad_dot: `ref_weight` must be [R, C, F], got ", W.sizes());
  TORCH_CHECK(is_float_dtype(feats.scalar_type()), "grad_dot: `feats` must be a floating tensor, got ", feats.scalar_type());
  TORCH_CHECK(grad.scalar_type() == feats.scalar_type() || grad.scalar_type() == acc_dtype(feats.scalar_type()),
              "grad_dot: `grad_logits` dtype ", grad.scalar_type(), " must equal `feats` dtype ", feats.scalar_type(),
              " or be ", acc_dtype(feats.scalar_type()));
  TORCH_CHECK(W.scalar_type() == acc_dtype(feats.scalar_type()), "grad_dot: `ref_weight` must be ",
              acc_dtype(feats.scalar_type()), " for `feats` of dtype ", feats.scalar_type(), ", got ", W.scalar_type());
  TORCH_CHECK(grad.size(0) == feats.size(0) && grad.size(2) == feats.size(2), "grad_dot: `grad_logits` ", grad.sizes(),
              " must be [B, C, P] with B and P of `feats` ", feats.sizes());
  TORCH_CHECK(W.size(1) == grad.size(1) && W.size(2) == feats.size(1), "grad_dot: `ref_weight` ", W.sizes(),
              " must be [R, C, F] with C of `grad_logits` ", grad.sizes(), " and F of `feats` ", feats.sizes());
  TORCH_CHECK(grad.device() == feats.device() && W.device() == feats.device(),
              "grad_dot: `feats`, `grad_logits` and `ref_weight` must be on one device");
  if (bias.has_value()) {
    const auto& b = *bias;
    TORCH_CHECK(b.dim() == 2 && b.size(0) == W.size(0) && b.size(1) == W.size(1), "grad_dot: `ref_bias` must be [R, C] = [",
                W.size(0), ", ", W.size(1), "], got ", b.sizes());
    TORCH_CHECK(b.scalar_type() == W.scalar_type(), "grad_dot: `ref_bias` dtype must equal `ref_weight` dtype");
    TORCH_CHECK(b.device() == feats.device(), "grad_dot: `ref_bias` must be on the device of `feats`");
  }
}

inline void check_foreground_paste(const at::Tensor& x_i, const at::Tensor& x_j, const at::Tensor& y_i,
                                   const at::Tensor& cls, const at::Tensor& p1_i, const at::Tensor& p1_j,
                                   const at::Tensor& p2_i, const at::Tensor& p2_j) {
  TORCH_CHECK(x_i.dim() == 4, "foreground_paste: `x_i` must be [B, K, H, W], got ", x_i.sizes());
  TORCH_CHECK(x_j.sizes() == x_i.sizes(), "foreground_paste: `x_j` ", x_j.sizes(), " must match `x_i` ", x_i.sizes());
  TORCH_CHECK(is_float_dtype(x_i.scalar_type()) && x_j.scalar_type() == x_i.scalar_type(),
              "foreground_paste: `x_i` and `x_j` must share one floating dtype");
  const auto B = x_i.size(0), H = x_i.size(2), W = x_i.size(3);
  TORCH_CHECK(y_i.dim() == 3 && y_i.size(0) == B && y_i.size(1) == H && y_i.size(2) == W,
              "foreground_paste: `y_i` must be [B, H, W] = [", B, ", ", H, ", ", W, "], got ", y_i.sizes());
  TORCH_CHECK(y_i.scalar_type() == at::kLong, "foreground_paste: `y_i` must be int64, got ", y_i.scalar_type());
  TORCH_CHECK(cls.dim() == 1 && cls.size(0) == B, "foreground_paste: `cls` must be [B] = [", B, "], got ", cls.sizes());
  TORCH_CHECK(cls.scalar_type() == at::kLong, "foreground_paste: `cls` must be int64, got ", cls.scalar_type());
  const at::Tensor* ps[4] = {&p1_i, &p1_j, &p2_i, &p2_j};
  const char* names[4] = {"p1_i", "p1_j", "p2_i", "p2_j"};
  for (int i = 0; i < 4; ++i) {
    const auto& p = *ps[i];
    TORCH_CHECK(p.dim() == 4 && p.size(0) == B && p.size(1) == p1_i.size(1) && p.size(2) == H && p.size(3) == W,
                "foreground_paste: `", names[i], "` must be [B, C, H, W] like `p1_i` ", p1_i.sizes(), ", got ", p.sizes());
    TORCH_CHECK(is_float_dtype(p.scalar_type()) && p.scalar_type() == p1_i.scalar_type(), "foreground_paste: `", names[i],
                "` must be floating with the dtype of `p1_i`");
    TORCH_CHECK(p.device() == x_i.device(), "foreground_paste: `", names[i], "` must be on the device of `x_i`");
  }
  TORCH_CHECK(p1_i.size(1) >= 1, "foreground_paste: predictions need at least one class");
  TORCH_CHECK(x_j.device() == x_i.device() && y_i.device() == x_i.device() && cls.device() == x_i.device(),
              "foreground_paste: all inputs must be on one device");
}

}  // namespace hybrid_accel
