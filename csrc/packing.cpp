#include "packing.h"

#include <algorithm>
#include <set>
#include <stdexcept>
#include <string>
#include <tuple>
#include <utility>

namespace fused_train {

std::vector<std::vector<int64_t>> plan_packing(const int64_t* lengths, int64_t count, int64_t max_tokens,
                                               bool split_long) {
  if (max_tokens < 1) {
    throw std::invalid_argument("max_tokens must be >= 1, got " + std::to_string(max_tokens));
  }
  // (tokens, document) pieces to place: whole documents, or the chunks of a long one.
  std::vector<std::pair<int64_t, int64_t>> pieces;
  pieces.reserve(static_cast<size_t>(count));
  for (int64_t doc = 0; doc < count; ++doc) {
    int64_t length = lengths[doc];
    if (length < 1) {
      throw std::invalid_argument("lengths[" + std::to_string(doc) + "] must be >= 1, got " + std::to_string(length));
    }
    if (length > max_tokens) {
      if (!split_long) {
        throw std::invalid_argument("lengths[" + std::to_string(doc) + "] = " + std::to_string(length) +
                                    " exceeds max_tokens = " + std::to_string(max_tokens) +
                                    " (pass split_long=True to cut it into chunks)");
      }
      for (; length > max_tokens; length -= max_tokens) pieces.emplace_back(max_tokens, doc);
    }
    pieces.emplace_back(length, doc);
  }
  // Longest first; among equals, the lower document first, so plans are deterministic and the
  // chunks of one document keep their order.
  std::stable_sort(pieces.begin(), pieces.end(),
                   [](const auto& a, const auto& b) { return a.first > b.first; });

  std::vector<std::vector<int64_t>> rows;
  // Open rows keyed by (free tokens, row): lower_bound finds the tightest row that still fits.
  std::set<std::pair<int64_t, int64_t>> open_rows;
  for (const auto& [tokens, doc] : pieces) {
    auto best = open_rows.lower_bound({tokens, -1});
    int64_t row;
    int64_t free_tokens;
    if (best == open_rows.end()) {
      row = static_cast<int64_t>(rows.size());
      rows.emplace_back();
      free_tokens = max_tokens;
    } else {
      std::tie(free_tokens, row) = *best;
      open_rows.erase(best);
    }
    rows[static_cast<size_t>(row)].push_back(doc);
    if (free_tokens - tokens > 0) open_rows.emplace(free_tokens - tokens, row);
  }
  return rows;
}

}  // namespace fused_train
