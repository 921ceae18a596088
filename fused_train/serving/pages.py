"""The KV page allocator: which fixed-size pages of the cache are free, shared or cached. Pure bookkeeping, no torch.

The cache is one pool of `num_pages` pages of `page_size` tokens per layer (the tensors live in
`fused_train.serving.paged_cache`); page `p` is the same page index in every layer, so one
allocator serves them all. A sequence holds a list of pages, its page table: token `j` of the
sequence lives in page `pages[j // page_size]` at offset `j % page_size`. A sequence's memory rounds
up to one page, never more.

Prefix caching (vLLM's automatic prefix caching, nano-vllm's block manager): a full page whose keys
and values are written can be `register`ed under its `block_key`, a chained hash of the adapter,
every token before the page (through the parent page's key) and the page's own tokens. Pages are
reference counted: a sequence whose prompt starts with registered blocks `share`s those pages
read-only instead of computing them again. A page whose last holder releases it stays registered
and keeps its contents, free to be taken back by `share`; `grow` hands out never-registered free
pages first and evicts registered ones least recently released first, only when it must.
"""

import hashlib
from array import array
from collections import OrderedDict

from fused_train.ops.checks import check_int


def block_key(parent: bytes | None, tokens: list[int], adapter) -> bytes:
    """The key of a full page holding `tokens`, after the page whose key is `parent` (None for a
    sequence's first page), under `adapter` (its identity, the version included: its `repr` is
    hashed). SHA-256: two different prefixes never share a key, so never a page."""
    if parent is None:
        parent = hashlib.sha256(repr(adapter).encode()).digest()
    return hashlib.sha256(parent + array("q", tokens).tobytes()).digest()


class PageAllocator:
    def __init__(self, num_pages: int, page_size: int):
        check_int(num_pages=num_pages, page_size=page_size)
        self.num_pages = num_pages
        self.page_size = page_size
        # Last freed, first reused: a page just freed is likely still in the GPU's L2.
        self._free = list(range(num_pages - 1, -1, -1))
        self._refs = [0] * num_pages
        self._page_of: dict[bytes, int] = {}  # block key -> its registered page
        self._key_of: dict[int, bytes] = {}
        self._evictable: OrderedDict[int, None] = OrderedDict()  # registered pages nobody holds, LRU first

    @property
    def free_pages(self) -> int:
        """Pages `grow` can hand out: never-registered free pages and registered ones nobody holds."""
        return len(self._free) + len(self._evictable)

    @property
    def used_pages(self) -> int:
        return self.num_pages - self.free_pages

    @property
    def cached_pages(self) -> int:
        """Registered pages, held or not."""
        return len(self._key_of)

    def refs(self, page: int) -> int:
        """How many sequences hold `page`."""
        return self._refs[page]

    def pages_for(self, num_tokens: int) -> int:
        """Pages that `num_tokens` tokens fill (a partial page counts whole)."""
        return -(-num_tokens // self.page_size)

    def grow(self, pages: list[int], num_tokens: int) -> bool:
        """Append to `pages` what it lacks to hold `num_tokens` tokens; all or nothing: False (and
        `pages` unchanged) when too few pages are free."""
        needed = self.pages_for(num_tokens) - len(pages)
        if needed <= 0:
            return True
        if needed > self.free_pages:
            return False
        for _ in range(needed):
            if self._free:
                page = self._free.pop()
            else:  # the least recently released cached block gives its page
                page, _ = self._evictable.popitem(last=False)
                del self._page_of[self._key_of.pop(page)]
            self._refs[page] = 1
            pages.append(page)
        return True

    def release(self, pages: list[int]) -> None:
        """Drop a reference to every page of `pages`, and empty it. A page nobody holds any more is
        free; a registered one stays cached."""
        # Last page first: a sequence's tail is the least likely to be shared, so it is evicted first.
        for page in reversed(pages):
            self._refs[page] -= 1
            if self._refs[page] == 0:
                if page in self._key_of:
                    self._evictable[page] = None
                else:
                    self._free.append(page)
        pages.clear()

    def cached(self, keys: list[bytes]) -> list[int]:
        """The registered pages of the longest prefix of `keys` (nothing is held)."""
        found = []
        for key in keys:
            page = self._page_of.get(key)
            if page is None:
                break
            found.append(page)
        return found

    def share(self, pages: list[int], shared: list[int]) -> None:
        """Append the registered pages `shared` (from `cached`) to `pages`, one reference more each."""
        for page in shared:
            if self._refs[page] == 0:
                del self._evictable[page]
            self._refs[page] += 1
            pages.append(page)

    def register(self, page: int, key: bytes) -> None:
        """`page` is full and written: it holds the block `key` from now on. A key registered to
        another page already keeps that page (two sequences computed the same block at once)."""
        if key in self._page_of or page in self._key_of:
            return
        self._page_of[key] = page
        self._key_of[page] = key
