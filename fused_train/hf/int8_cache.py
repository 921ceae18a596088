"""`Int8KVCache`: a transformers `Cache` that stores keys and values as int8 and is attended to as int8.

Each layer keeps `data` int8 `[batch, num_kv_heads, capacity, head_dim]` and `scale` float32
`[batch, num_kv_heads, capacity]` for keys and for values: one symmetric scale per token and kv
head, set when the token is appended and never revisited (`fused_train.kernels.int8_kv_quantize`
says why this granularity). At head_dim 128 that is (128 + 4) / 256 = 0.52 of a bfloat16 cache.

The most recent `residual_length` tokens (32 by default) are also kept exactly, in the model's
dtype, in a ring of that many slots (position p at slot p % residual_length), and attention reads
them from there: every token is attended to exactly for its first residual_length steps, then as
int8. As in KIVI (arXiv 2402.02750) and transformers' `QuantizedCache` (its `residual_length`),
because a decoder's next token leans most on the last few: on `bench/eval_kv_quality.py` (three
trainings of a tiny Llama) greedy agreement with the full-precision cache rises from 92.1% (int8
only) to 98.6%, above a cache merely rounded to bfloat16 (97.4%). The ring costs residual_length
tokens at full precision per layer: at head_dim 128 in bfloat16 the cache is 0.547 of a bfloat16
one at 1k tokens, 0.523 at 4k, 0.518 at 16k (0.516 with residual_length=0). Every token is still
quantized when it is appended, so leaving the ring needs no work, and `crop` only shortens the
exact window.

How it is attended to: the prompt's forward (an empty cache) quantizes the keys and values into
the cache and hands the model back the fresh full-precision tensors, so prefill attends exactly
as without a cache (varlen kernel). Every later forward hands the model `Int8KV` objects instead
of tensors; the `"fused_train"` attention implementation sends those to the int8 decode kernel,
which reads the int8 blocks, their scales and the ring directly (on a plain CPU, the reference
dequantizes).
So the cache only works on a model patched with `fused_train.patch(model)`, and says so otherwise.
"""

import inspect

import torch
from transformers.cache_utils import Cache, CacheLayerMixin, DynamicLayer

from fused_train.hf.attention import ATTENTION_NAME, Int8KV
from fused_train.ops.int8_kv import quantize_kv_append

# Newer transformers crop by minus the number of tokens to drop (`tokens_to_remove`), older ones
# by the length to keep (`max_length`); DynamicLayer's parameter name says which this one does.
_CROP_TAKES_TOKENS_TO_REMOVE = "tokens_to_remove" in inspect.signature(DynamicLayer.crop).parameters


class Int8KVLayer(CacheLayerMixin):
    """One attention layer's int8 keys and values; grows in steps of `block_tokens` positions."""

    is_compileable = False
    is_croppable = True
    is_sliding = False

    def __init__(self, max_cache_len: int | None = None, block_tokens: int = 256, residual_length: int = 32):
        super().__init__()
        self.is_initialized = False  # transformers 4.x's base class does not set it
        self.max_cache_len = max_cache_len
        self.block_tokens = block_tokens
        self.residual_length = residual_length
        self.length = 0
        # With a ring, it holds positions [exact_from, length); always exact_from >= length - residual_length.
        self.exact_from = 0
        self.buffers: dict[str, torch.Tensor] = {}

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        batch, num_kv_heads, _, head_dim = key_states.shape
        self.buffers = self._int8_buffers(batch, num_kv_heads, head_dim, self.max_cache_len or 0)
        if self.residual_length:
            ring_shape = (batch, num_kv_heads, self.residual_length, head_dim)
            self.buffers["k_recent"] = torch.empty(ring_shape, dtype=self.dtype, device=self.device)
            self.buffers["v_recent"] = torch.empty(ring_shape, dtype=self.dtype, device=self.device)
        self.is_initialized = True

    def _int8_buffers(self, batch, num_kv_heads, head_dim, capacity):
        data_shape, scale_shape = (batch, num_kv_heads, capacity, head_dim), (batch, num_kv_heads, capacity)
        return {
            "k_data": torch.empty(data_shape, dtype=torch.int8, device=self.device),
            "k_scale": torch.empty(scale_shape, dtype=torch.float32, device=self.device),
            "v_data": torch.empty(data_shape, dtype=torch.int8, device=self.device),
            "v_scale": torch.empty(scale_shape, dtype=torch.float32, device=self.device),
        }

    @property
    def capacity(self) -> int:
        return self.buffers["k_data"].shape[2] if self.buffers else 0

    def _reserve(self, tokens: int) -> None:
        if tokens <= self.capacity:
            return
        if self.max_cache_len is not None:
            raise ValueError(
                f"Int8KVCache holds max_cache_len={self.max_cache_len} tokens per sequence, {tokens} were asked "
                "for; create it with a larger max_cache_len (or None, to grow as needed)"
            )
        # Growing by whole blocks keeps the memory within a block of what is used, and copies the
        # cache once per block_tokens appended tokens (transformers' DynamicCache copies it every step).
        batch, num_kv_heads, _, head_dim = self.buffers["k_data"].shape
        capacity = -(-tokens // self.block_tokens) * self.block_tokens
        for name, buffer in self._int8_buffers(batch, num_kv_heads, head_dim, capacity).items():
            buffer[:, :, : self.length] = self.buffers[name][:, :, : self.length]
            self.buffers[name] = buffer

    def _write_recent(self, key_states, value_states, start):
        """Copy the new tokens that stay within the last residual_length into their ring slots."""
        end = start + key_states.shape[2]
        first = max(start, end - self.residual_length)
        slot = first % self.residual_length
        # At most residual_length positions from `first`: one run of slots, or two if it wraps.
        head = min(end - first, self.residual_length - slot)
        for name, states in (("k_recent", key_states), ("v_recent", value_states)):
            ring = self.buffers[name]
            ring[:, :, slot : slot + head] = states[:, :, first - start : first - start + head]
            if head < end - first:  # a decode step's one token never wraps: no second copy per layer
                ring[:, :, : end - first - head] = states[:, :, first - start + head : end - start]
        self.exact_from = max(self.exact_from, end - self.residual_length)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        expected = (self.buffers["k_data"].shape[0], self.buffers["k_data"].shape[1], self.buffers["k_data"].shape[3])
        for name, states in (("key_states", key_states), ("value_states", value_states)):
            if states.dim() != 4 or (states.shape[0], states.shape[1], states.shape[3]) != expected:
                raise ValueError(
                    f"Int8KVCache: {name} must be [batch, num_kv_heads, tokens, head_dim] with (batch, num_kv_heads, "
                    f"head_dim) = {expected} as in earlier calls, got {tuple(states.shape)}"
                )
        start, new_tokens = self.length, key_states.shape[2]
        self._reserve(start + new_tokens)
        quantize_kv_append(key_states, self.buffers["k_data"], self.buffers["k_scale"], start)
        quantize_kv_append(value_states, self.buffers["v_data"], self.buffers["v_scale"], start)
        if self.residual_length:
            self._write_recent(key_states, value_states, start)
        self.length = start + new_tokens
        if start == 0:
            # Prefill: attend to the exact keys and values just computed (see the module docstring).
            return key_states, value_states
        return self.keys_int8, self.values_int8

    @property
    def keys_int8(self) -> Int8KV:
        return self._int8_view("k")

    @property
    def values_int8(self) -> Int8KV:
        return self._int8_view("v")

    def _int8_view(self, kind):
        recent = self.buffers.get(f"{kind}_recent")
        exact_from = self.length if recent is None else self.exact_from
        return Int8KV(self.buffers[f"{kind}_data"], self.buffers[f"{kind}_scale"], self.length, self.dtype, recent,
                      exact_from)  # fmt: skip

    def get_seq_length(self, *args) -> int:
        return self.length

    def get_mask_sizes(self, query_length) -> tuple[int, int]:
        # transformers < 5 passes cache_position (a tensor of the new positions), 5.x its length.
        if isinstance(query_length, torch.Tensor):
            query_length = query_length.shape[0]
        return self.length + query_length, 0

    def get_max_length(self) -> int:
        return -1 if self.max_cache_len is None else self.max_cache_len

    def get_max_cache_shape(self) -> int:  # the name of get_max_length before transformers 5
        return self.get_max_length()

    def reset(self) -> None:
        self.length = 0
        self.exact_from = 0

    def crop(self, max_length: int) -> None:
        if _CROP_TAKES_TOKENS_TO_REMOVE and max_length > 0:
            raise ValueError(f"Int8KVCache.crop takes minus the number of tokens to drop, got {max_length}")
        counts_from_end = max_length < 0 or _CROP_TAKES_TOKENS_TO_REMOVE
        keep = self.length + max_length if counts_from_end else min(max_length, self.length)
        if keep < 0:
            raise ValueError(f"Int8KVCache.crop({max_length}) would drop more than the {self.length} cached tokens")
        self.length = keep
        # Ring slots of the kept positions still hold them; the exact window just ends earlier.
        self.exact_from = min(self.exact_from, keep)

    def _map_batch(self, fn) -> None:
        if self.is_initialized:
            self.buffers = {name: fn(buffer) for name, buffer in self.buffers.items()}

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._map_batch(lambda buffer: buffer.index_select(0, beam_idx.to(buffer.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map_batch(lambda buffer: buffer.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._map_batch(lambda buffer: buffer[indices])

    def offload(self):
        self._map_batch(lambda buffer: buffer.to("cpu", non_blocking=True))

    def prefetch(self):
        self._map_batch(lambda buffer: buffer.to(self.device, non_blocking=True))

    def nbytes(self) -> int:
        return sum(buffer.numel() * buffer.element_size() for buffer in self.buffers.values())


class Int8KVCache(Cache):
    """An int8 KV cache for `model.generate` on a model patched with `fused_train.patch`.

        model = fused_train.patch(model)
        out = model.generate(**inputs, past_key_values=Int8KVCache(model.config), max_new_tokens=2000)

    Args:
        config: the model's config (its text config is used for multimodal models).
        max_cache_len: tokens per sequence to allocate at once (prompt + new tokens), or None to
            grow in steps of `block_tokens` as tokens arrive.
        block_tokens: the growth step, in tokens.
        residual_length: how many of the most recent tokens are also held exactly, in the model's
            dtype, and attended to from there (see the module docstring); 0 for int8 only.

    `nbytes()` is the memory the cache holds (int8 data and float32 scales, keys and values, and
    the exact ring).
    Beam search (`reorder_cache`), assisted decoding (`crop`), `reset` and batch expansion work as
    with `DynamicCache`. Sliding-window layers keep every token and mask in the kernel.
    """

    def __init__(self, config, max_cache_len: int | None = None, block_tokens: int = 256, residual_length: int = 32):
        if max_cache_len is not None and max_cache_len < 1:
            raise ValueError(f"max_cache_len must be a positive int or None, got {max_cache_len}")
        if block_tokens < 1:
            raise ValueError(f"block_tokens must be a positive int, got {block_tokens}")
        if not isinstance(residual_length, int) or residual_length < 0:
            raise ValueError(f"residual_length must be an int >= 0, got {residual_length!r}")
        self.config = config.get_text_config(decoder=True)
        layers = [
            Int8KVLayer(max_cache_len, block_tokens, residual_length) for _ in range(self.config.num_hidden_layers)
        ]
        super().__init__(layers=layers)

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        implementation = getattr(self.config, "_attn_implementation", None)
        if implementation != ATTENTION_NAME:
            raise ValueError(
                f"Int8KVCache needs a model patched with fused_train.patch(model) (attention implementation "
                f"{ATTENTION_NAME!r}), this one uses {implementation!r}: its attention cannot read int8 keys and values"
            )
        return super().update(key_states, value_states, layer_idx, *args, **kwargs)

    def nbytes(self) -> int:
        """Bytes held by all layers: int8 keys and values, their float32 scales, the exact rings."""
        return sum(layer.nbytes() for layer in self.layers)
