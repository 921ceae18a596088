"""Varlen (packed) attention with flash-attn conventions.

Layout: `q` is `[total_q, num_heads, head_dim]`, `k`/`v` are `[total_k, num_kv_heads, head_dim]`;
sequence `b` owns rows `cu_seqlens_q[b]:cu_seqlens_q[b+1]` of `q` and `cu_seqlens_k[b]:cu_seqlens_k[b+1]`
of `k`/`v`. Query row `i` of a sequence with `Lq` queries and `Lk` keys may see key `j` when

    causal:             j <= i + (Lk - Lq)                       (bottom-right aligned)
    window (left, r):   i + (Lk - Lq) - left <= j <= i + (Lk - Lq) + r   (-1: unbounded side)

Scores are `s = q·k * softmax_scale`, then `softcap * tanh(s / softcap)` when `softcap > 0`.
A query row that can see no key (only possible when `Lq > Lk` under a causal mask) outputs zeros
and has `lse = -inf`.
"""

import math

import torch
import torch.nn.functional as F


def check_varlen_inputs(q, k, v, cu_seqlens_q, cu_seqlens_k, window_size, softcap):
    """Raise ValueError naming the argument when inputs break the layout described above."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 3:
            raise ValueError(f"{name} must be a 3-D tensor [total_tokens, heads, head_dim], got {_describe(t)}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v must share a dtype, got q={q.dtype}, k={k.dtype}, v={v.dtype}")
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        raise ValueError(f"q must be float16, bfloat16, float32 or float64, got {q.dtype}")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got k={tuple(k.shape)}, v={tuple(v.shape)}")
    if q.shape[2] != k.shape[2]:
        raise ValueError(f"q and k must have the same head_dim, got {q.shape[2]} and {k.shape[2]}")
    if k.shape[1] == 0 or q.shape[1] % k.shape[1] != 0:
        raise ValueError(
            f"num_heads of q ({q.shape[1]}) must be a multiple of num_kv_heads of k/v ({k.shape[1]})"
        )
    devices = {t.device for t in (q, k, v, cu_seqlens_q, cu_seqlens_k)}
    if len(devices) != 1:
        raise ValueError(f"q, k, v, cu_seqlens_q, cu_seqlens_k must be on one device, got {sorted(map(str, devices))}")
    batch = None
    for name, cu, total in (("cu_seqlens_q", cu_seqlens_q, q.shape[0]), ("cu_seqlens_k", cu_seqlens_k, k.shape[0])):
        if not isinstance(cu, torch.Tensor) or cu.dtype != torch.int32 or cu.dim() != 1 or cu.numel() < 2:
            raise ValueError(f"{name} must be a 1-D int32 tensor of length batch+1 >= 2, got {_describe(cu)}")
        if batch is not None and cu.numel() - 1 != batch:
            raise ValueError(
                f"cu_seqlens_q and cu_seqlens_k must describe the same batch, got {batch} and {cu.numel() - 1} sequences"
            )
        batch = cu.numel() - 1
        values = cu.tolist()
        if values[0] != 0 or any(b < a for a, b in zip(values, values[1:])):
            raise ValueError(f"{name} must start at 0 and be non-decreasing, got {values[:8]}{'...' if len(values) > 8 else ''}")
        if values[-1] != total:
            raise ValueError(f"{name}[-1] must equal the number of rows ({total}), got {values[-1]}")
    if len(window_size) != 2 or any(int(w) < -1 for w in window_size):
        raise ValueError(f"window_size must be (left, right) with -1 meaning unbounded, got {window_size}")
    if softcap < 0:
        raise ValueError(f"softcap must be >= 0, got {softcap}")


def _describe(t):
    if isinstance(t, torch.Tensor):
        return f"tensor of shape {tuple(t.shape)} and dtype {t.dtype}"
    return type(t).__name__


def visible_keys_mask(len_q, len_k, causal, window_size, device):
    """Bool `[len_q, len_k]`: True where query row i may attend to key j (see module docstring)."""
    diagonal = len_k - len_q
    rows = torch.arange(len_q, device=device)[:, None] + diagonal
    cols = torch.arange(len_k, device=device)[None, :]
    left, right = window_size
    if causal:
        right = 0 if right < 0 else min(right, 0)
    mask = torch.ones(len_q, len_k, dtype=torch.bool, device=device)
    if right >= 0:
        mask &= cols <= rows + right
    if left >= 0:
        mask &= cols >= rows - left
    return mask


def varlen_attention_ref(
    q,
    k,
    v,
    cu_seqlens_q,
    cu_seqlens_k,
    causal=True,
    softmax_scale=None,
    window_size=(-1, -1),
    softcap=0.0,
    return_lse=False,
):
    """Plain-PyTorch varlen attention, one attention per sequence: `out` or `(out, lse)`.

    `out` has the shape and dtype of `q`; `lse` is `[num_heads, total_q]` float32 (natural log),
    the convention of flash-attn's varlen API. Math runs in float32 (float64 for float64 inputs).
    When neither softcap nor the lse is asked for, each sequence goes through
    `scaled_dot_product_attention` (this is also the CPU path of patched models); otherwise scores
    are computed explicitly. Autograd differentiates either.
    """
    num_heads, head_dim = q.shape[1], q.shape[2]
    group = num_heads // k.shape[1]
    scale = head_dim**-0.5 if softmax_scale is None else softmax_scale
    compute_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    outs, lses = [], []
    bounds_q, bounds_k = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    for b in range(len(bounds_q) - 1):
        q_seq = q[bounds_q[b] : bounds_q[b + 1]].transpose(0, 1).to(compute_dtype)
        k_seq = k[bounds_k[b] : bounds_k[b + 1]].transpose(0, 1).to(compute_dtype)
        v_seq = v[bounds_k[b] : bounds_k[b + 1]].transpose(0, 1).to(compute_dtype)
        len_q, len_k = q_seq.shape[1], k_seq.shape[1]
        if len_q == 0:
            continue
        # Rows that see no key (causal, more queries than keys) would be NaN in SDPA.
        if not return_lse and softcap == 0 and not (causal and len_q > len_k):
            plain_causal = causal and len_q == len_k and tuple(window_size) == (-1, -1)
            mask = None if plain_causal or (not causal and tuple(window_size) == (-1, -1)) else (
                visible_keys_mask(len_q, len_k, causal, window_size, q.device)
            )
            out = F.scaled_dot_product_attention(
                q_seq, k_seq, v_seq, attn_mask=mask, is_causal=plain_causal, scale=scale, enable_gqa=group > 1
            )
            outs.append(out.transpose(0, 1))
            continue
        k_seq = k_seq.repeat_interleave(group, dim=0)
        v_seq = v_seq.repeat_interleave(group, dim=0)
        mask = visible_keys_mask(len_q, len_k, causal, window_size, q.device)
        scores = torch.matmul(q_seq, k_seq.transpose(1, 2)) * scale
        if softcap > 0:
            scores = softcap * torch.tanh(scores / softcap)
        scores = scores.masked_fill(~mask, float("-inf"))
        lse = torch.logsumexp(scores, dim=-1)
        # exp(-inf - -inf) would be NaN on rows that see no key; those rows output zeros.
        probs = torch.exp(scores - lse.masked_fill(lse == float("-inf"), 0.0)[..., None])
        outs.append(torch.matmul(probs, v_seq).transpose(0, 1))
        lses.append(lse.float())
    out = torch.cat(outs).to(q.dtype) if outs else q.new_zeros(q.shape)
    if not return_lse:
        return out
    lse = torch.cat(lses, dim=1) if lses else q.new_zeros((num_heads, 0), dtype=torch.float32)
    return out, lse
