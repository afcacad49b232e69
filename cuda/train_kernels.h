// Fused element-wise kernels of the Llama training step (issue 7): RMSNorm, rotary embeddings,
// SwiGLU and the cross-entropy row pass. A plain C++ API over raw device pointers and a stream, like
// cuda/ffa.h (no LibTorch here); core/fused_ops_cuda.cpp wraps them as autograd functions.
//
// Conventions: "bf16" pointers are __nv_bfloat16 arrays passed as void*, "fp32" ones are float*.
// Every array is dense row-major (the last dimension contiguous, rows back to back) and its base
// pointer 16-byte aligned. Launch errors throw std::runtime_error. All math is in fp32.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

namespace fused {

// ---- RMSNorm, as HF's LlamaRMSNorm: y = weight * bf16(x * rstd), rstd = rsqrt(mean(x^2) + eps),
// with the product by the weight rounded to bf16 once more (the weight multiplies a bf16 tensor).
// Supported: cols a multiple of 8, at most kRmsNormMaxCols.
constexpr int64_t kRmsNormMaxCols = 8192;
bool rmsnorm_supported(int64_t cols);
// x, weight, y: bf16 (rows, cols), (cols), (rows, cols); rstd: fp32 (rows), saved for the backward.
void rmsnorm_forward(const void* x, const void* weight, void* y, float* rstd, int64_t rows, int64_t cols,
                     float eps, cudaStream_t stream);
// Floats of scratch the backward needs for its per-block partial sums of dweight.
int64_t rmsnorm_backward_workspace_floats(int64_t rows, int64_t cols);
// dy, x, weight: bf16; rstd from the forward; dx: bf16 (rows, cols); dweight: fp32 (cols), the sum
// over rows of dy * bf16(x * rstd) (no atomics: partial sums per block, then one reduction pass).
void rmsnorm_backward(const void* dy, const void* x, const void* weight, const float* rstd, void* dx,
                      float* dweight, float* workspace, int64_t rows, int64_t cols, cudaStream_t stream);

// ---- Residual add + RMSNorm (the Llama layer's h = x + delta, then the next norm of h): h is the bf16
// sum rounded once, as torch's bf16 add gives it, and y = RMSNorm(h) bit for bit as rmsnorm_forward
// computes it from h. x, delta, h, y: bf16 (rows, cols); rstd as above.
void add_rmsnorm_forward(const void* x, const void* delta, const void* weight, void* h, void* y, float* rstd,
                         int64_t rows, int64_t cols, float eps, cudaStream_t stream);
// The backward of both outputs at once: dx = dres + d RMSNorm(h) / dh . dy, rounded to bf16 once
// (dres: the gradient of h itself, from the residual path; null counts as zeros). It is the
// gradient of x and of delta alike. x here is the forward's h; dweight as in rmsnorm_backward.
void add_rmsnorm_backward(const void* dy, const void* dres, const void* x, const void* weight, const float* rstd,
                          void* dx, float* dweight, float* workspace, int64_t rows, int64_t cols, cudaStream_t stream);

// ---- Rotary embeddings, HF's rotate_half convention, for q (tokens, heads_q, head_dim) and
// k (tokens, heads_k, head_dim) in one launch: out = x * cos + rotate_half(x) * sin with
// rotate_half(x) = cat(-x[D/2:], x[:D/2]). cos, sin: fp32 (tokens, head_dim) as core/rope.h makes
// them; they are rounded to bf16 first, as HF does when it casts them to the activations' dtype.
// inverse = true applies the transposed rotation (the backward: dx from dout).
// Supported: head_dim a multiple of 16.
bool rope_supported(int64_t head_dim);
void rope_apply(const void* q_in, const void* k_in, void* q_out, void* k_out, const float* cos, const float* sin,
                int64_t tokens, int64_t heads_q, int64_t heads_k, int64_t head_dim, bool inverse,
                cudaStream_t stream);

// q|k|v packed: the rows of one projection GEMM, x @ [Wq; Wk; Wv]^T, (tokens, (heads_q + 2 heads_kv)
// * head_dim). The forward writes dense q (tokens, heads_q, head_dim), k and v (tokens, heads_kv,
// head_dim): q and k rotated as rope_apply does, v copied. The backward takes dense dq, dk, dv and
// writes the packed gradient rows (the transposed rotation for q and k), ready for the two GEMMs.
void rope_qkv_forward(const void* qkv, void* q, void* k, void* v, const float* cos, const float* sin, int64_t tokens,
                      int64_t heads_q, int64_t heads_kv, int64_t head_dim, cudaStream_t stream);
void rope_qkv_backward(const void* dq, const void* dk, const void* dv, void* dqkv, const float* cos, const float* sin,
                       int64_t tokens, int64_t heads_q, int64_t heads_kv, int64_t head_dim, cudaStream_t stream);

// ---- SwiGLU: out = silu(gate) * up over n bf16 elements; the backward recomputes silu.
void swiglu_forward(const void* gate, const void* up, void* out, int64_t n, cudaStream_t stream);
void swiglu_backward(const void* dout, const void* gate, const void* up, void* dgate, void* dup, int64_t n,
                     cudaStream_t stream);
// The same by rows: gate, up (and dgate, dup) rows of `cols` elements at row stride in_stride, out
// and dout dense (rows, cols). gate = y, up = y + cols, in_stride = 2 * cols reads the two halves of
// one GEMM output y = x @ [Wg; Wu]^T, and the backward writes its gradient in the same layout.
void swiglu_forward_rows(const void* gate, const void* up, int64_t in_stride, void* out, int64_t rows, int64_t cols,
                         cudaStream_t stream);
void swiglu_backward_rows(const void* dout, const void* gate, const void* up, int64_t in_stride, void* dgate, void* dup,
                          int64_t rows, int64_t cols, cudaStream_t stream);

// ---- Cross-entropy over one chunk of bf16 logits (rows, vocab), one block per row, in fp32:
//   row_loss[r] = logsumexp(logits[r]) - logits[r][label[r]], or 0 where label is ignore_index;
//   with write_grad the logits are overwritten in place by softmax(logits[r]) - onehot(label[r]) in
//   bf16 (all zeros on ignored rows): d row_loss / d logits, ready for the two gradient GEMMs.
// labels: int64 (rows). A label outside [0, vocab) counts as ignored (callers validate labels first).
void cross_entropy_rows(void* logits, const int64_t* labels, int64_t ignore_index, float* row_loss, int64_t rows,
                        int64_t vocab, bool write_grad, cudaStream_t stream);

}  // namespace fused
