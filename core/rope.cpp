#include "core/rope.h"

#include <ATen/ATen.h>

#include <cmath>

#include "core/errors.h"

namespace flexcp {

at::Tensor rope_inv_freq(const LlamaArch& arch) {
  const int64_t dim = arch.head_dim;
  if (dim <= 0 || dim % 2 != 0)
    fail("model", "head_dim " + std::to_string(dim) + " must be a positive even number for rotary embeddings");
  // HF: 1.0 / (base ** (arange(0, dim, 2, int64).float() / dim)), every step in fp32.
  at::Tensor exponent = at::arange(0, dim, 2, at::kLong).to(at::kFloat) / static_cast<double>(dim);
  at::Tensor inv_freq = at::reciprocal(at::pow(arch.rope_theta, exponent));
  const RopeScaling& rs = arch.rope_scaling;
  if (rs.type == "none" || rs.type == "default" || rs.type.empty()) return inv_freq;
  if (rs.type != "llama3")
    fail("model.rope_scaling.type", "unknown rope scaling '" + rs.type + "'", "use llama3 or none");
  if (!(rs.factor > 0) || !(rs.high_freq_factor > rs.low_freq_factor) || !(rs.low_freq_factor > 0) ||
      rs.original_max_position_embeddings <= 0)
    fail("model.rope_scaling", "llama3 scaling needs factor > 0, 0 < low_freq_factor < high_freq_factor and "
                               "original_max_position_embeddings > 0",
         "use the values of the model's config.json");
  const double factor = rs.factor, lo = rs.low_freq_factor, hi = rs.high_freq_factor;
  const double old_len = static_cast<double>(rs.original_max_position_embeddings);
  const double low_freq_wavelen = old_len / lo;
  const double high_freq_wavelen = old_len / hi;
  // Same expressions, same order and fp32 tensors as HF's _compute_llama3_parameters. Python
  // evaluates `scalar / tensor` as tensor.reciprocal() * scalar, so that is what is written here.
  at::Tensor wavelen = inv_freq.reciprocal() * (2 * M_PI);
  at::Tensor scaled = at::where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq);
  at::Tensor smooth = (wavelen.reciprocal() * old_len - lo) / (hi - lo);
  at::Tensor smoothed = (1 - smooth) * scaled / factor + smooth * scaled;
  at::Tensor medium = at::logical_and(at::logical_not(wavelen < high_freq_wavelen),
                                      at::logical_not(wavelen > low_freq_wavelen));
  return at::where(medium, smoothed, scaled);
}

RopeCosSin rope_cos_sin(const at::Tensor& inv_freq, const at::Tensor& positions) {
  TORCH_CHECK(positions.dim() == 1, "rope_cos_sin: positions must be (T,)");
  at::Tensor f = inv_freq.to(positions.device(), at::kFloat);
  // HF: inv_freq[:, None] @ position[None, :] in fp32, a product per element (inner size 1).
  at::Tensor freqs = positions.to(at::kFloat).unsqueeze(1) * f.unsqueeze(0);  // (T, D/2)
  at::Tensor emb = at::cat({freqs, freqs}, -1);                                 // (T, D)
  return {emb.cos(), emb.sin()};
}

at::Tensor rope_apply(const at::Tensor& x, const RopeCosSin& cs) {
  TORCH_CHECK(x.dim() == 3, "rope_apply: x must be (T, H, D)");
  const int64_t half = x.size(2) / 2;
  at::Tensor cos = cs.cos.to(x.scalar_type()).unsqueeze(1);  // (T, 1, D)
  at::Tensor sin = cs.sin.to(x.scalar_type()).unsqueeze(1);
  at::Tensor x1 = x.narrow(2, 0, half);
  at::Tensor x2 = x.narrow(2, half, x.size(2) - half);
  at::Tensor rotated = at::cat({-x2, x1}, 2);
  return x * cos + rotated * sin;
}

}  // namespace flexcp
