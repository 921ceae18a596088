#include "packing.h"

#include <algorithm>
#include <limits>
#include <numeric>
#include <set>
#include <stdexcept>
#include <string>
#include <utility>

namespace fused_train {
namespace {

constexpr int64_t kMaxPieces = std::numeric_limits<int32_t>::max();

// A set of integers in [0, size) as a tree of 64-bit words, each bit of a level saying whether the
// word below has any bit set: `next` costs a few word operations per level, log_64(size) levels.
class BitTree {
 public:
  explicit BitTree(int64_t size) {
    do {
      size = (size + 63) / 64;
      levels_.emplace_back(static_cast<size_t>(size), 0);
    } while (size > 1);
  }

  void insert(int64_t x) {
    for (auto& words : levels_) {
      words[x >> 6] |= uint64_t{1} << (x & 63);
      x >>= 6;
    }
  }

  void erase(int64_t x) {
    for (auto& words : levels_) {
      words[x >> 6] &= ~(uint64_t{1} << (x & 63));
      if (words[x >> 6] != 0) return;
      x >>= 6;
    }
  }

  // The smallest member >= x, or -1.
  int64_t next(int64_t x, size_t level = 0) const {
    const auto& words = levels_[level];
    int64_t index = x >> 6;
    if (index >= static_cast<int64_t>(words.size())) return -1;
    uint64_t bits = words[index] & (~uint64_t{0} << (x & 63));
    if (bits == 0) {
      if (level + 1 == levels_.size()) return -1;
      index = next(index + 1, level + 1);
      if (index < 0) return -1;
      bits = words[index];
    }
    return (index << 6) | __builtin_ctzll(bits);
  }

 private:
  std::vector<std::vector<uint64_t>> levels_;
};

// The open rows by free tokens, for max_tokens <= kDenseMaxTokens: per free count the row
// indices, sorted descending so the lowest comes off the back, and a BitTree of the free counts
// that have open rows. A sorted vector rather than a heap: the lists are short (tens of rows), an
// insert is a branch-free binary search plus a small memmove, and taking a row is a pop_back; the
// heap's sift-downs mispredicted and made the whole planner ~10% slower.
class DenseOpenRows {
 public:
  explicit DenseOpenRows(int64_t max_tokens)
      : rows_by_free_(static_cast<size_t>(max_tokens)), free_counts_(max_tokens) {}

  // Takes out the open row with the fewest free tokens >= `tokens`, the lowest row among equals:
  // (free tokens, row), or row -1 if no open row has room.
  std::pair<int64_t, int64_t> take(int64_t tokens) {
    const int64_t free = free_counts_.next(tokens);
    if (free < 0) return {0, -1};
    auto& rows = rows_by_free_[static_cast<size_t>(free)];
    const int64_t row = rows.back();
    rows.pop_back();
    if (rows.empty()) free_counts_.erase(free);
    return {free, row};
  }

  void add(int64_t free, int64_t row) {
    auto& rows = rows_by_free_[static_cast<size_t>(free)];
    if (rows.empty()) free_counts_.insert(free);
    // The first position whose row is below `row`: a binary search with a conditional move.
    const int32_t* first = rows.data();
    size_t count = rows.size();
    while (count > 1) {
      const size_t half = count / 2;
      first = first[half - 1] > row ? first + half : first;
      count -= half;
    }
    if (count == 1 && *first > row) ++first;
    rows.insert(rows.begin() + (first - rows.data()), static_cast<int32_t>(row));
  }

 private:
  std::vector<std::vector<int32_t>> rows_by_free_;
  BitTree free_counts_;
};

// The same for any max_tokens: an ordered set of (free tokens, row).
class SparseOpenRows {
 public:
  std::pair<int64_t, int64_t> take(int64_t tokens) {
    auto best = rows_.lower_bound({tokens, -1});
    if (best == rows_.end()) return {0, -1};
    const auto found = *best;
    rows_.erase(best);
    return found;
  }

  void add(int64_t free, int64_t row) { rows_.emplace(free, row); }

 private:
  std::set<std::pair<int64_t, int64_t>> rows_;
};

// How many full `max_tokens` chunks a document is cut into before its remainder of 1 to
// max_tokens tokens. Most documents are short: skipping the 64-bit division for them saved ~10%
// of the whole planning time on the benchmark.
int64_t full_chunks_of(int64_t length, int64_t max_tokens) {
  return length > max_tokens ? (length - 1) / max_tokens : 0;
}

// The pieces to place (whole documents, or the full chunks and remainder of a long one), longest
// first; equal lengths in document order, so plans are deterministic and a document's chunks keep
// their order. Their lengths are kept as runs rather than one per piece: the counting sort below
// then scatters one array instead of two, and that scatter is most of its time.
struct Pieces {
  std::vector<int32_t> doc;
  std::vector<std::pair<int64_t, int64_t>> runs;  // (tokens, end): pieces [previous end, end) have `tokens`
};

Pieces pieces_longest_first(const int64_t* lengths, int64_t count, int64_t max_tokens) {
  Pieces pieces;
  if (max_tokens <= kDenseMaxTokens) {
    // Counting sort by length, O(count + max_tokens): next_slot[t] is where the next piece of
    // t tokens goes.
    std::vector<int64_t> next_slot(static_cast<size_t>(max_tokens) + 1, 0);
    for (int64_t doc = 0; doc < count; ++doc) {
      const int64_t full_chunks = full_chunks_of(lengths[doc], max_tokens);
      next_slot[max_tokens] += full_chunks;
      ++next_slot[lengths[doc] - full_chunks * max_tokens];
    }
    int64_t num_pieces = 0;
    for (int64_t tokens = max_tokens; tokens >= 1; --tokens) {
      if (next_slot[tokens] == 0) continue;
      const int64_t start = num_pieces;
      num_pieces += next_slot[tokens];
      next_slot[tokens] = start;
      pieces.runs.emplace_back(tokens, num_pieces);
    }
    pieces.doc.resize(static_cast<size_t>(num_pieces));
    for (int64_t doc = 0; doc < count; ++doc) {
      const int64_t full_chunks = full_chunks_of(lengths[doc], max_tokens);
      for (int64_t chunk = 0; chunk < full_chunks; ++chunk) pieces.doc[next_slot[max_tokens]++] = static_cast<int32_t>(doc);
      pieces.doc[next_slot[lengths[doc] - full_chunks * max_tokens]++] = static_cast<int32_t>(doc);
    }
  } else {
    std::vector<std::pair<int64_t, int64_t>> pairs;  // (tokens, document)
    pairs.reserve(static_cast<size_t>(count));
    for (int64_t doc = 0; doc < count; ++doc) {
      const int64_t full_chunks = full_chunks_of(lengths[doc], max_tokens);
      for (int64_t chunk = 0; chunk < full_chunks; ++chunk) pairs.emplace_back(max_tokens, doc);
      pairs.emplace_back(lengths[doc] - full_chunks * max_tokens, doc);
    }
    std::stable_sort(pairs.begin(), pairs.end(), [](const auto& a, const auto& b) { return a.first > b.first; });
    pieces.doc.reserve(pairs.size());
    for (size_t p = 0; p < pairs.size(); ++p) {
      pieces.doc.push_back(static_cast<int32_t>(pairs[p].second));
      if (p + 1 == pairs.size() || pairs[p + 1].first != pairs[p].first) {
        pieces.runs.emplace_back(pairs[p].first, static_cast<int64_t>(p + 1));
      }
    }
  }
  return pieces;
}

// Best fit: each piece goes into the open row with the fewest free tokens that still holds it,
// or opens a new row. Sets piece_row[p] to the row of piece p; returns 0 and then the number of
// pieces of each row (row offsets before their prefix sum).
template <typename OpenRows>
std::vector<int64_t> place_pieces(const Pieces& pieces, int64_t max_tokens, OpenRows& open_rows,
                                  std::vector<int32_t>& piece_row) {
  std::vector<int64_t> row_sizes = {0};
  int64_t p = 0;
  for (const auto& [tokens, end] : pieces.runs) {
    while (p < end) {
      auto [free, row] = open_rows.take(tokens);
      if (row < 0) {
        free = max_tokens;
        row = static_cast<int64_t>(row_sizes.size()) - 1;
        row_sizes.push_back(0);
      }
      // While the row keeps room for another piece of this length, it stays the only best fit:
      // the row had the fewest free tokens >= `tokens` (or was the only one), so no other row has
      // its new, smaller free count >= `tokens`. Filling it at once skips a take and an add per
      // piece; on short documents most rows fill this way.
      const int64_t placed = std::min(end - p, free / tokens);
      for (const int64_t last = p + placed; p < last; ++p) piece_row[p] = static_cast<int32_t>(row);
      row_sizes[row + 1] += placed;
      free -= placed * tokens;
      if (free > 0) open_rows.add(free, row);
    }
  }
  return row_sizes;
}

}  // namespace

PackingPlan plan_packing(const int64_t* lengths, int64_t count, int64_t max_tokens, bool split_long) {
  if (max_tokens < 1) {
    throw std::invalid_argument("max_tokens must be >= 1, got " + std::to_string(max_tokens));
  }
  int64_t num_pieces = 0;
  for (int64_t doc = 0; doc < count; ++doc) {
    if (lengths[doc] < 1) {
      throw std::invalid_argument("lengths[" + std::to_string(doc) + "] must be >= 1, got " +
                                  std::to_string(lengths[doc]));
    }
    if (lengths[doc] > max_tokens && !split_long) {
      throw std::invalid_argument("lengths[" + std::to_string(doc) + "] = " + std::to_string(lengths[doc]) +
                                  " exceeds max_tokens = " + std::to_string(max_tokens) +
                                  " (pass split_long=True to cut it into chunks)");
    }
    num_pieces += full_chunks_of(lengths[doc], max_tokens) + 1;
    if (num_pieces > kMaxPieces) {
      throw std::invalid_argument("lengths[:" + std::to_string(doc + 1) + "] already make more than " +
                                  std::to_string(kMaxPieces) + " pieces (documents and chunks), the most one plan "
                                  "holds; plan the documents in shards");
    }
  }

  const Pieces pieces = pieces_longest_first(lengths, count, max_tokens);
  std::vector<int32_t> piece_row(pieces.doc.size());
  PackingPlan plan;
  if (max_tokens <= kDenseMaxTokens) {
    DenseOpenRows open_rows(max_tokens);
    plan.row_offsets = place_pieces(pieces, max_tokens, open_rows, piece_row);
  } else {
    SparseOpenRows open_rows;
    plan.row_offsets = place_pieces(pieces, max_tokens, open_rows, piece_row);
  }

  // Group the pieces by row, keeping placement order within a row (a stable counting sort).
  std::partial_sum(plan.row_offsets.begin(), plan.row_offsets.end(), plan.row_offsets.begin());
  std::vector<int64_t> next_slot(plan.row_offsets.begin(), plan.row_offsets.end() - 1);
  plan.doc_ids.resize(pieces.doc.size());
  for (size_t p = 0; p < piece_row.size(); ++p) plan.doc_ids[next_slot[piece_row[p]]++] = pieces.doc[p];
  return plan;
}

}  // namespace fused_train
