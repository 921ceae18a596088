"""Varlen (packed) attention with flash-attn conventions.

Layout: `q` is `[total_q, num_heads, head_dim]`, `k`/`v` are `[total_k, num_kv_heads, head_dim]`;
sequence `b` owns rows `cu_seqlens_q[b]:cu_seqlens_q[b+1]` of `q` and `cu_seqlens_k[b]:cu_seqlens_k[b+1]`
of `k`/`v`. Query row `i` of a sequence with `Lq` queries and `Lk` keys may see key `j` when

    causal:             j <= i + (Lk - Lq)                       (bottom-right aligned)
    window (left, r):   i + (Lk - Lq) - left <= j <= i + (Lk - Lq) + r   (-1: unbounded side)

Scores are `s = q·k * softmax_scale`, then `softcap * tanh(s / softcap)` when `softcap > 0`.
A query row that can see no key (when `Lq > Lk` under a causal mask, or a right window reaching
left of key 0) outputs zeros and has `lse = -inf`.

This module holds the input checks and the plain-PyTorch reference; it imports no Triton, so the
reference path runs where Triton is not installed. The kernels are in `varlen_attention.py`.
"""

import torch
import torch.nn.functional as F

from .launch import assert_on_device, describe, values_readable

def check_varlen_inputs(q, k, v, cu_seqlens_q, cu_seqlens_k, window_size, softcap, check_cu_seqlens_values=True):
    """Raise ValueError naming the argument when inputs break the layout described above.

    The values of `cu_seqlens_*` are read back on a CPU; elsewhere they are asserted on the device
    (`assert_on_device`: no host sync, a few small launches), which `check_cu_seqlens_values=False`
    skips for callers that built or checked them already (a patched model, once per batch).
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 3:
            raise ValueError(f"{name} must be a 3-D tensor [total_tokens, heads, head_dim], got {describe(t)}")
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
            raise ValueError(f"{name} must be a 1-D int32 tensor of length batch+1 >= 2, got {describe(cu)}")
        if batch is not None and cu.numel() - 1 != batch:
            raise ValueError(
                f"cu_seqlens_q and cu_seqlens_k must describe the same batch, "
                f"got {batch} and {cu.numel() - 1} sequences"
            )
        batch = cu.numel() - 1
        if not check_cu_seqlens_values:
            continue
        if not values_readable(cu):
            valid = (cu[0] == 0) & (cu[-1] == total) & (cu[1:] >= cu[:-1]).all()
            assert_on_device(
                valid, f"{name} must start at 0, be non-decreasing and end at the number of rows ({total})"
            )
            continue
        values = cu.tolist()
        if values[0] != 0 or any(b < a for a, b in zip(values, values[1:])):
            raise ValueError(
                f"{name} must start at 0 and be non-decreasing, got {values[:8]}{'...' if len(values) > 8 else ''}"
            )
        if values[-1] != total:
            raise ValueError(f"{name}[-1] must equal the number of rows ({total}), got {values[-1]}")
    if len(window_size) != 2 or any(int(w) < -1 for w in window_size):
        raise ValueError(f"window_size must be (left, right) with -1 meaning unbounded, got {window_size}")
    if softcap < 0:
        raise ValueError(f"softcap must be >= 0, got {softcap}")


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
    causal=False,
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
    # split() rather than slicing per sequence: its backward is one concatenation, where each
    # slice's backward would add a full-size zero tensor per sequence.
    lengths_q = (cu_seqlens_q[1:] - cu_seqlens_q[:-1]).tolist()
    lengths_k = (cu_seqlens_k[1:] - cu_seqlens_k[:-1]).tolist()
    q_docs = q.to(compute_dtype).split(lengths_q)
    k_docs = k.to(compute_dtype).split(lengths_k)
    v_docs = v.to(compute_dtype).split(lengths_k)
    for q_doc, k_doc, v_doc in zip(q_docs, k_docs, v_docs):
        q_seq, k_seq, v_seq = q_doc.transpose(0, 1), k_doc.transpose(0, 1), v_doc.transpose(0, 1)
        len_q, len_k = q_seq.shape[1], k_seq.shape[1]
        if len_q == 0:
            continue
        # Rows that see no key would be NaN in SDPA. Row i's last visible key is i + diag + right, so
        # every row sees one when row 0 does (window left sides never empty a row).
        right = window_size[1] if not causal else (0 if window_size[1] < 0 else min(window_size[1], 0))
        every_row_sees_a_key = len_k > 0 and (right < 0 or len_k - len_q + right >= 0)
        if not return_lse and softcap == 0 and every_row_sees_a_key:
            plain_causal = causal and len_q == len_k and tuple(window_size) == (-1, -1)
            mask = None if plain_causal or (not causal and tuple(window_size) == (-1, -1)) else (
                visible_keys_mask(len_q, len_k, causal, window_size, q.device)
            )
            # 4-D inputs: on CPU, 3-D ones fall back to SDPA's math path (a full score matrix).
            out = F.scaled_dot_product_attention(
                q_seq[None], k_seq[None], v_seq[None], attn_mask=mask, is_causal=plain_causal, scale=scale,
                enable_gqa=group > 1,
            )
            outs.append(out[0].transpose(0, 1))
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



def varlen_attention_bwd_ref(
    dout,
    dlse,
    q,
    k,
    v,
    cu_seqlens_q,
    cu_seqlens_k,
    causal=False,
    softmax_scale=None,
    window_size=(-1, -1),
    softcap=0.0,
):
    """Plain-PyTorch backward of `varlen_attention_ref(..., return_lse=True)`: `(dq, dk, dv)`.

    Given the gradients `dout` of `out` and `dlse` of `lse` (None where the lse was not used), with
    the backward kernels' math, one sequence at a time: `p = softmax(s)`, `dv = p^T do`,
    `ds = p * (do v^T - rowsum(do * o) + dlse)` (times `1 - tanh^2` under a softcap),
    `dq = ds k * scale`, `dk = ds^T q * scale`; dk and dv are summed over each GQA group's query
    heads. The probabilities and `o = p v` are recomputed in the compute dtype (float32, float64
    for float64 inputs) rather than read from the forward's float32 lse and `q`-dtype output.
    This is what the custom op runs where the kernel cannot, so it needs no autograd (none runs
    inside a custom op).
    """
    num_heads, head_dim = q.shape[1], q.shape[2]
    num_kv_heads = k.shape[1]
    group = num_heads // num_kv_heads
    scale = head_dim**-0.5 if softmax_scale is None else softmax_scale
    compute_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    lengths_q = (cu_seqlens_q[1:] - cu_seqlens_q[:-1]).tolist()
    lengths_k = (cu_seqlens_k[1:] - cu_seqlens_k[:-1]).tolist()
    if dlse is None:
        dlse = q.new_zeros((num_heads, q.shape[0]), dtype=compute_dtype)
    pieces = zip(
        *(t.to(compute_dtype).split(lengths_q) for t in (q, dout)),
        *(t.to(compute_dtype).split(lengths_k) for t in (k, v)),
        dlse.to(compute_dtype).split(lengths_q, dim=1),
    )
    dqs, dks, dvs = [], [], []
    for q_doc, do_doc, k_doc, v_doc, dlse_doc in pieces:
        len_q, len_k = q_doc.shape[0], k_doc.shape[0]
        # [heads, tokens, head_dim], keys and values repeated to every query head of their group.
        q_seq, do_seq = q_doc.transpose(0, 1), do_doc.transpose(0, 1)
        k_seq = k_doc.transpose(0, 1).repeat_interleave(group, dim=0)
        v_seq = v_doc.transpose(0, 1).repeat_interleave(group, dim=0)
        scores = torch.matmul(q_seq, k_seq.transpose(1, 2)) * scale
        if softcap > 0:
            capped = torch.tanh(scores / softcap)
            scores = softcap * capped
        scores = scores.masked_fill(~visible_keys_mask(len_q, len_k, causal, window_size, q.device), float("-inf"))
        lse = torch.logsumexp(scores, dim=-1, keepdim=True)
        # A row that sees no key (lse -inf) has probabilities zero, as its output.
        probs = torch.exp(scores - lse.masked_fill(lse == float("-inf"), 0.0))
        delta = (do_seq * torch.matmul(probs, v_seq)).sum(-1, keepdim=True) - dlse_doc[..., None]
        dscores = probs * (torch.matmul(do_seq, v_seq.transpose(1, 2)) - delta)
        if softcap > 0:
            dscores = dscores * (1 - capped * capped)
        dqs.append((torch.matmul(dscores, k_seq) * scale).transpose(0, 1))
        dk_seq = torch.matmul(dscores.transpose(1, 2), q_seq) * scale
        dv_seq = torch.matmul(probs.transpose(1, 2), do_seq)
        dks.append(dk_seq.view(num_kv_heads, group, len_k, head_dim).sum(1).transpose(0, 1))
        dvs.append(dv_seq.view(num_kv_heads, group, len_k, head_dim).sum(1).transpose(0, 1))
    return torch.cat(dqs).to(q.dtype), torch.cat(dks).to(k.dtype), torch.cat(dvs).to(v.dtype)
