#include "core/micro_batch.h"

#include <ATen/ATen.h>

#include "core/errors.h"

namespace flexcp {

MicroBatch micro_batch_build(const std::vector<TokenWindow>& windows, bool document_mask, const at::Device& device) {
  if (windows.empty()) fail("micro-batch", "no windows");
  const int64_t s = static_cast<int64_t>(windows[0].tokens.size()) - 1, b = static_cast<int64_t>(windows.size());
  // Pinned host memory for a GPU run: the copies below are then asynchronous (a copy from pageable
  // memory waits for the whole stream, a host sync in the middle of a step with grad_accum > 1).
  const auto host = at::TensorOptions(at::kLong).pinned_memory(device.is_cuda());
  auto tokens = at::empty({b * s}, host), labels = at::empty({b * s}, host), pos = at::empty({b * s}, host);
  auto ta = tokens.accessor<int64_t, 1>(), la = labels.accessor<int64_t, 1>(), pa = pos.accessor<int64_t, 1>();
  MicroBatch mb;
  mb.spec.num_q = mb.spec.num_k = b * s;
  for (int64_t n = 0; n < b; ++n) {
    const auto& w = windows[n];
    if (static_cast<int64_t>(w.tokens.size()) != s + 1) fail("micro-batch", "windows of different lengths");
    const int64_t base = n * s;
    mb.sample_starts.push_back(base);
    for (int64_t i = 0; i < s; ++i) {
      ta[base + i] = w.tokens[i];
      la[base + i] = w.tokens[i + 1];
      pa[base + i] = i;
    }
    if (document_mask && !w.doc_starts.empty()) {
      for (size_t d = 0; d < w.doc_starts.size(); ++d) {
        const int64_t a = w.doc_starts[d], e = d + 1 < w.doc_starts.size() ? w.doc_starts[d + 1] : s;
        if (e > a) mb.spec.slices.push_back({{base + a, base + e}, {base + a, base + e}, MaskType::Causal});
      }
    } else {
      mb.spec.slices.push_back({{base, base + s}, {base, base + s}, MaskType::Causal});
    }
  }
  // non_blocking: the caching host allocator keeps the pinned buffers until the copies are done.
  mb.tokens = tokens.to(device, /*non_blocking=*/true);
  mb.labels = labels.to(device, /*non_blocking=*/true);
  mb.positions = pos.to(device, /*non_blocking=*/true);
  return mb;
}

}  // namespace flexcp
