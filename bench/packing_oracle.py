"""Pure-Python best-fit-decreasing packing: the tests' oracle and the benchmark's baseline.

Same algorithm and tie-breaking as the C++ planner `fused_train.plan_packing`, so both return
identical plans: pieces (whole documents, or the `max_tokens` chunks and remainder of a long one)
are taken longest first, equal lengths in document order; each goes into the open row with the
smallest free space that still holds it, equal free space to the lower row index, or else opens a
new row.

The open rows are kept as a sorted list of their distinct free-token counts (found with
`bisect`) and, per count, a heap of row indices (the lowest comes out first). A search is
O(log n); inserting or removing a count moves the list's tail, O(#distinct counts) but at most
`max_tokens - 1` entries and done in C by `list.insert`, so fast in practice. A sorted list of
(free, row) pairs, the textbook choice, was 1.2-1.7x slower on the benchmark's 10^6 lengths: it
shifts up to one entry per open row (tens of thousands) on every placement.

Like the C++ planner, it fills the row it found with further pieces of the same length while the
row has room for them, without searching again: the row had the fewest free tokens that still
held the piece, so no other open row has its new, smaller free count and room for the piece.
That gives the plan of placing the pieces one at a time (the tests check it against a brute-force
search) and made this oracle ~1.4x faster on the benchmark's lengths.
"""

import bisect
import heapq
from operator import itemgetter


def plan_packing_python(lengths, max_tokens: int, split_long: bool = True) -> list[list[int]]:
    """Document indices per row; see the module docstring and `fused_train.plan_packing`."""
    pieces = []  # (tokens, document)
    for doc, length in enumerate(lengths):
        if length < 1:
            raise ValueError(f"lengths[{doc}] must be >= 1, got {length}")
        if length > max_tokens and not split_long:
            raise ValueError(f"lengths[{doc}] = {length} exceeds max_tokens = {max_tokens}")
        while length > max_tokens:
            pieces.append((max_tokens, doc))
            length -= max_tokens
        pieces.append((length, doc))
    pieces.sort(key=itemgetter(0), reverse=True)  # stable, also with reverse=True

    rows = []
    free_counts = []  # sorted distinct free-token counts of the open rows
    rows_by_free = {}  # free-token count -> heap of the open rows with that many free tokens
    p = 0
    while p < len(pieces):
        tokens = pieces[p][0]
        i = bisect.bisect_left(free_counts, tokens)
        if i == len(free_counts):
            row, free = len(rows), max_tokens
            rows.append([])
        else:
            free = free_counts[i]
            heap = rows_by_free[free]
            row = heapq.heappop(heap)
            if not heap:
                del free_counts[i], rows_by_free[free]
        # The row stays the only best fit for further pieces of this length while it has room.
        while True:
            rows[row].append(pieces[p][1])
            free -= tokens
            p += 1
            if free < tokens or p == len(pieces) or pieces[p][0] != tokens:
                break
        if free > 0:
            heap = rows_by_free.get(free)
            if heap is None:
                rows_by_free[free] = [row]
                bisect.insort(free_counts, free)
            else:
                heapq.heappush(heap, row)
    return rows
