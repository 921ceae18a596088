#pragma once

#include <cstdint>
#include <vector>

namespace fused_train {

// Up to this many tokens per row the planner indexes its tables by token count (about 32 bytes
// per possible count: 32 MiB at the limit); longer rows use an ordered set instead.
constexpr int64_t kDenseMaxTokens = int64_t{1} << 20;

// A packing plan in compressed-row form: row r holds the documents
// doc_ids[row_offsets[r]] .. doc_ids[row_offsets[r + 1] - 1], in the order they were placed.
struct PackingPlan {
  std::vector<int64_t> row_offsets;  // num_rows + 1 entries, starting at 0
  std::vector<int64_t> doc_ids;
};

// Best-fit-decreasing packing of documents into rows of `max_tokens` tokens.
// A document longer than `max_tokens` is cut into full `max_tokens` chunks plus a remainder
// when `split_long` is true (each chunk appears as its document's index, full chunks in rows
// that come before the remainder's row); otherwise it throws std::invalid_argument.
PackingPlan plan_packing(const int64_t* lengths, int64_t count, int64_t max_tokens, bool split_long);

}  // namespace fused_train
