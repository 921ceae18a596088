"""The KV page allocator: which fixed-size pages of the cache are free. Pure bookkeeping, no torch.

The cache is one pool of `num_pages` pages of `page_size` tokens per layer (the tensors live in
`fused_train.serving.paged_cache`); page `p` is the same page index in every layer, so one
allocator serves them all. A sequence holds a list of pages, its page table: token `j` of the
sequence lives in page `pages[j // page_size]` at offset `j % page_size`. A sequence's memory rounds
up to one page, never more.
"""

from fused_train.ops.checks import check_int


class PageAllocator:
    def __init__(self, num_pages: int, page_size: int):
        check_int(num_pages=num_pages, page_size=page_size)
        self.num_pages = num_pages
        self.page_size = page_size
        # Last freed, first reused: a page just freed is likely still in the GPU's L2.
        self._free = list(range(num_pages - 1, -1, -1))

    @property
    def free_pages(self) -> int:
        return len(self._free)

    @property
    def used_pages(self) -> int:
        return self.num_pages - len(self._free)

    def pages_for(self, num_tokens: int) -> int:
        """Pages that `num_tokens` tokens fill (a partial page counts whole)."""
        return -(-num_tokens // self.page_size)

    def grow(self, pages: list[int], num_tokens: int) -> bool:
        """Append to `pages` what it lacks to hold `num_tokens` tokens; all or nothing: False (and
        `pages` unchanged) when too few pages are free."""
        needed = self.pages_for(num_tokens) - len(pages)
        if needed <= 0:
            return True
        if needed > len(self._free):
            return False
        for _ in range(needed):
            pages.append(self._free.pop())
        return True

    def release(self, pages: list[int]) -> None:
        """Return every page of `pages` to the free list, and empty it."""
        self._free.extend(reversed(pages))
        pages.clear()
