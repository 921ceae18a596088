"""The paged KV cache's tensors, and the per-step `Cache` object that hands them to attention.

`PagedKVCache` holds, per layer, `k_pages`/`v_pages` `[num_pages, num_kv_heads, page_size,
head_dim]`: int8 with float32 scales `[num_pages, num_kv_heads, page_size]` (one per token and kv
head, `fused_train.kernels.int8_kv_quantize`'s quantization), or the model's dtype
(`kv_dtype="model"`, for exact comparisons and as a baseline). Which pages belong to whom is
`pages.PageAllocator`'s business; nothing here knows about requests.

A step's forward gets `StepCache(cache, metadata)` as its `past_key_values`. Each layer's `update`
writes the step's new keys and values into their slots (quantize-on-append for int8 pages) and
returns `PagedKV` handles instead of tensors; the `"fused_train"` attention
(`fused_train.hf.attention`) reads them: prefills attend to their fresh exact keys with the varlen
kernel, decodes to their pages with the paged decode kernel. Where the step's tokens are is one
`PagedAttentionMetadata`, built once by the runner and only read by the layers (`PagedLayout` is
its old name).
"""

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from fused_train.hf.attention import ATTENTION_NAME, PagedAttentionMetadata, PagedKV
from fused_train.ops.paged_kv import write_kv_pages

__all__ = ["PagedAttentionMetadata", "PagedKVCache", "PagedLayout", "StepCache"]

PagedLayout = PagedAttentionMetadata  # its old name


class PagedKVCache:
    """Every layer's pages: `num_pages` pages of `page_size` tokens, int8 or `dtype`."""

    def __init__(self, config, num_pages: int, page_size: int, kv_dtype, dtype: torch.dtype, device):
        config = config.get_text_config(decoder=True)
        self.num_layers = config.num_hidden_layers
        self.num_kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.num_pages, self.page_size = num_pages, page_size
        self.quantized = kv_dtype == "int8"
        shape = (num_pages, self.num_kv_heads, page_size, self.head_dim)
        page_dtype = torch.int8 if self.quantized else dtype
        self.k_pages = [torch.zeros(shape, dtype=page_dtype, device=device) for _ in range(self.num_layers)]
        self.v_pages = [torch.zeros(shape, dtype=page_dtype, device=device) for _ in range(self.num_layers)]
        if self.quantized:
            self.k_scales = [torch.zeros(shape[:3], device=device) for _ in range(self.num_layers)]
            self.v_scales = [torch.zeros(shape[:3], device=device) for _ in range(self.num_layers)]
        else:
            self.k_scales = self.v_scales = [None] * self.num_layers

    def nbytes(self) -> int:
        """Bytes of every page tensor and scale of every layer."""
        tensors = self.k_pages + self.v_pages + [t for t in self.k_scales + self.v_scales if t is not None]
        return sum(t.numel() * t.element_size() for t in tensors)

    def bytes_per_token(self) -> float:
        return self.nbytes() / (self.num_pages * self.page_size)


class _StepLayer(CacheLayerMixin):
    """A layer of a step's cache: no length of its own (the step's metadata says where each token is)."""

    is_compileable = False
    is_sliding = False

    def __init__(self):
        super().__init__()
        self.is_initialized = True

    def lazy_initialization(self, key_states, value_states):
        pass

    def update(self, key_states, value_states, *args, **kwargs):
        raise NotImplementedError("StepCache.update writes the pages")

    def get_seq_length(self, *args) -> int:
        # Zero: transformers then builds masks over this step's tokens alone, which the
        # fused_train mask turns into None; positions come from the position ids the runner passes.
        return 0

    def get_mask_sizes(self, query_length, *args) -> tuple[int, int]:
        if isinstance(query_length, torch.Tensor):  # transformers < 5 passes cache_position
            query_length = query_length.shape[0]
        return query_length, 0

    def get_max_length(self) -> int:
        return -1

    def get_max_cache_shape(self) -> int:
        return -1

    def reset(self) -> None:
        pass


class StepCache(Cache):
    """`past_key_values` of one step's forward over `cache`, its tokens placed by `metadata`."""

    def __init__(self, cache: PagedKVCache, metadata: PagedAttentionMetadata, config):
        # Checked here, once per step, not by every layer: only the fused_train attention reads PagedKV.
        if getattr(config.get_text_config(decoder=True), "_attn_implementation", None) != ATTENTION_NAME:
            raise ValueError("StepCache needs a model patched with fused_train.patch(model)")
        self.cache, self.metadata = cache, metadata
        super().__init__(layers=[_StepLayer() for _ in range(cache.num_layers)])

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        cache = self.cache
        # [1, num_kv_heads, tokens, head_dim] -> [tokens, num_kv_heads, head_dim]
        keys, values = key_states[0].transpose(0, 1), value_states[0].transpose(0, 1)
        metadata = self.metadata
        write_kv_pages(
            keys, values, cache.k_pages[layer_idx], cache.v_pages[layer_idx], metadata.slots,
            k_scales=cache.k_scales[layer_idx], v_scales=cache.v_scales[layer_idx], check_inputs=False,
            slot_pages=metadata.slot_pages, slot_offsets=metadata.slot_offsets,
        )  # fmt: skip
        return (
            PagedKV(keys, cache.k_pages[layer_idx], cache.k_scales[layer_idx], metadata),
            PagedKV(values, cache.v_pages[layer_idx], cache.v_scales[layer_idx], metadata),
        )
