#pragma once

#include <cstdint>
#include <vector>

namespace fused_train {

// Best-fit-decreasing packing of documents into rows of `max_tokens` tokens.
// Returns, per row, the indices of the documents (or document chunks) placed in it.
// A document longer than `max_tokens` is cut into full `max_tokens` chunks plus a remainder
// when `split_long` is true (each chunk appears as its document's index, full chunks in rows
// that come before the remainder's row); otherwise it throws std::invalid_argument.
std::vector<std::vector<int64_t>> plan_packing(const int64_t* lengths, int64_t count, int64_t max_tokens,
                                               bool split_long);

}  // namespace fused_train
