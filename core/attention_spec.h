// The attention spec: the one interface between the model, context parallelism and the kernels
// (docs/attention-spec.md). A mask is a list of non-overlapping rectangular slices, each a q range,
// a k range and a mask type; tokens of a micro-batch are flattened into one axis.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

namespace flexcp {

// Values match cuda/ffa.h so a spec can be handed to the kernels without translation.
enum class MaskType : int32_t { Full = 0, Causal = 1, InvCausal = 2, BiCausal = 3 };

const char* mask_type_name(MaskType m);

struct Range {
  int64_t start = 0;
  int64_t end = 0;  // half-open
  int64_t size() const { return end - start; }
  bool empty() const { return end <= start; }
  bool operator==(const Range& o) const { return start == o.start && end == o.end; }
};

struct AttnSlice {
  Range q;
  Range k;
  MaskType mask = MaskType::Full;
};

struct AttentionSpec {
  std::vector<AttnSlice> slices;
  int64_t num_q = 0;  // length of the flattened query axis
  int64_t num_k = 0;  // length of the flattened key axis
};

// Visibility of key j for query i inside one slice (absolute indices), as the spec doc's table says.
bool slice_visible(const AttnSlice& s, int64_t i, int64_t j);
// Number of visible (i, j) pairs of a slice, of a whole spec, and of the rows [row_begin, row_end).
int64_t slice_area(const AttnSlice& s);
int64_t spec_area(const AttentionSpec& spec);
int64_t slice_area_rows(const AttnSlice& s, int64_t row_begin, int64_t row_end);
// Visible key interval [lo, hi) of query row i within slice s (empty when lo >= hi).
Range slice_row_keys(const AttnSlice& s, int64_t i);

// Throws UserError naming the first bad slice: out of bounds, negative length, or overlap with another
// slice in the (i, j) plane. Cheap enough to call once per batch.
void spec_validate(const AttentionSpec& spec);

// Common specs.
AttentionSpec spec_causal(int64_t seq_len);
// One causal block per sample of `batch` samples of `seq_len` tokens each (the flattened batch).
AttentionSpec spec_causal_batch(int64_t batch, int64_t seq_len);
// One CAUSAL slice per document; `doc_starts` are the absolute start offsets, the first must be 0
// (or the first offset of the region), ends at `end`.
AttentionSpec spec_documents(const std::vector<int64_t>& doc_starts, int64_t end);

std::string spec_to_string(const AttentionSpec& spec);

}  // namespace flexcp
