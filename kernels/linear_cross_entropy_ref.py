"""Fused linear cross-entropy: its math, the plain-PyTorch definition, and the chunked CPU path.

With hidden states `x` `[T, H]`, `W` `[V, H]`, optional `bias` `[V]`, targets `y` `[T]`, softcap
`c`, label smoothing `ε` and z-loss weight `λ`, per token `t` whose target is not `ignore_index`:

    z      = x_t · Wᵀ + bias                              [V] (fp32 accumulation)
    z'     = c · tanh(z / c)   (z' = z without softcap)
    lse    = log Σ_j exp(z'_j)
    loss_t = lse - (1 - ε) · z'_y - (ε / V) · Σ_j z'_j + λ · lse²

(cross-entropy against `(1 - ε) · onehot(y) + ε / V`, as `F.cross_entropy(label_smoothing=ε)`,
plus the z-loss); ignored tokens have `loss_t = 0`. The reduction is applied to `loss_t` outside
the kernels (`reduce_loss`), so every reduction's gradient arrives as one per-token factor
`g_t = ∂L / ∂loss_t` (mean: 1/N, sum: 1, none: the upstream gradient of token t; HF's
`num_items_in_batch`: 1/num_items_in_batch). The backward, with `p = softmax(z')`:

    dz'_j  = g_t · (p_j · (1 + 2λ · lse) - ε / V - (1 - ε) · [j = y])
    dz_j   = dz'_j · (1 - (z'_j / c)²)   (softcap only)
    dx_t   = dz · W        dW = Σ_t dz_tᵀ · x_t        dbias = Σ_t dz_t

`p_j - 1` for the target is formed in fp32 before anything is rounded to the input dtype.
`linear_cross_entropy_ref` is the definition (it materializes `[T, V]`: tests only);
`linear_cross_entropy_fwd_ref` / `_bwd_ref` compute the same loss and gradients in chunks of tokens,
never holding more than `[chunk, V]`: the op's path where the Triton kernels do not run (CPU).
This module needs no Triton; the kernels are in `linear_cross_entropy.py`.
"""

import torch
import torch.nn.functional as F

REDUCTIONS = ("mean", "sum", "none")
# The chunked path's `[chunk, V]` fp32 logits hold about this many elements (16 MB; 131 tokens at
# vocab 32k): small next to a `[T, V]` tensor at training sizes, and still enough rows that each
# chunk's matmul runs near full speed on a CPU.
CHUNK_ELEMENTS = 2**22


def reduce_loss(loss, labels, ignore_index, reduction, num_items_in_batch=None):
    """`loss` `[T]` per token (0 where `labels == ignore_index`) reduced: mean over the targeted
    tokens (or sum / `num_items_in_batch`, HF's gradient-accumulation divisor, when given), sum, or
    none (`loss` as is)."""
    if reduction == "none":
        return loss
    total = loss.sum()
    if reduction == "sum":
        return total
    if num_items_in_batch is not None:
        return total / num_items_in_batch
    return total / (labels != ignore_index).sum()


def linear_cross_entropy_ref(
    x, weight, labels, bias=None, ignore_index=-100, reduction="mean", label_smoothing=0.0, softcap=None, z_loss=0.0,
    num_items_in_batch=None,
):  # fmt: skip
    """The definition: logits `[..., V]` in at least fp32, `F.cross_entropy` on them, plus the z-loss;
    `reduction="none"` returns the shape of `labels`."""
    logits = F.linear(x, weight, bias).flatten(0, -2)
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    flat = labels.flatten()
    loss = F.cross_entropy(logits, flat, ignore_index=ignore_index, reduction="none", label_smoothing=label_smoothing)
    if z_loss:
        loss = loss + z_loss * torch.where(flat != ignore_index, torch.logsumexp(logits, -1) ** 2, 0.0)
    return reduce_loss(loss, flat, ignore_index, reduction, num_items_in_batch).reshape(
        labels.shape if reduction == "none" else ()
    )


def per_token_loss(row_max, log_sum, target, sum_logits, labels, ignore_index, label_smoothing, z_loss, vocab_size):
    """`loss_t` from each token's largest logit `m`, `log Σ exp(z' - m)`, target logit and `Σ z'`;
    `m - z'_y` comes first, so a confident token (`z'_y = m`) keeps its small loss exactly."""
    # lse - (1 - ε)·z'_y - ε·mean(z') with lse = m + log_sum, each difference to m taken first.
    loss = (1.0 - label_smoothing) * (row_max - target) + log_sum
    if label_smoothing:
        loss = loss + label_smoothing * (row_max - sum_logits / vocab_size)
    if z_loss:
        loss = loss + z_loss * (row_max + log_sum) ** 2
    return torch.where(labels != ignore_index, loss, 0.0)


def _chunk_tokens(vocab_size):
    return max(1, CHUNK_ELEMENTS // vocab_size)


def _capped_logits(x, weight, bias, softcap):
    """`(z', z' / c)` of one chunk in fp32 (float64 stays float64); the second is None without softcap."""
    logits = F.linear(x, weight, bias)
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    if softcap is None:
        return logits, None
    capped = torch.tanh(logits / softcap)
    return capped * softcap, capped


def linear_cross_entropy_fwd_ref(x, weight, bias, labels, ignore_index, label_smoothing, softcap, z_loss):
    """`(loss, stats)`: `[T]` and `[2, T]` (each token's largest logit and `log Σ exp(z' - max)`), in
    fp32 (float64 for float64 inputs), chunk by chunk of tokens."""
    num_tokens, vocab_size = x.shape[0], weight.shape[0]
    accum = torch.promote_types(x.dtype, torch.float32)
    loss = torch.empty(num_tokens, dtype=accum, device=x.device)
    stats = torch.empty(2, num_tokens, dtype=accum, device=x.device)
    step = _chunk_tokens(vocab_size)
    for start in range(0, num_tokens, step):
        rows = slice(start, start + step)
        logits, _ = _capped_logits(x[rows], weight, bias, softcap)
        target = logits.gather(1, torch.where(labels[rows] != ignore_index, labels[rows], 0)[:, None])[:, 0]
        sum_logits = logits.sum(-1) if label_smoothing else None
        row_max = logits.amax(-1)
        log_sum = logits.sub_(row_max[:, None]).exp_().sum(-1).log_()
        loss[rows] = per_token_loss(row_max, log_sum, target, sum_logits, labels[rows], ignore_index, label_smoothing,
                                    z_loss, vocab_size)  # fmt: skip
        stats[0, rows], stats[1, rows] = row_max, log_sum
    return loss, stats


def linear_cross_entropy_bwd_ref(
    grad_loss, x, weight, bias, labels, stats, ignore_index, label_smoothing, softcap, z_loss, compute_dx, compute_dw,
    compute_db,
):  # fmt: skip
    """`(dx, dW, dbias)` in the dtypes of `x`, `weight`, `bias` for the per-token gradient `grad_loss`
    `[T]`, the logits recomputed chunk by chunk; dW and dbias accumulate in fp32 (from fp32 dz).
    Those not asked for are None."""
    num_tokens, vocab_size = x.shape[0], weight.shape[0]
    accum = torch.promote_types(x.dtype, torch.float32)
    grad_x = torch.empty_like(x) if compute_dx else None
    grad_w = torch.zeros(weight.shape, dtype=accum, device=x.device) if compute_dw else None
    grad_b = torch.zeros(vocab_size, dtype=accum, device=x.device) if compute_db else None
    step = _chunk_tokens(vocab_size)
    for start in range(0, num_tokens, step):
        rows = slice(start, start + step)
        logits, capped = _capped_logits(x[rows], weight, bias, softcap)
        valid = labels[rows] != ignore_index
        scale = torch.where(valid, grad_loss[rows].to(accum), 0.0)
        # In place on the chunk's logits: one [chunk, V] buffer (two with softcap) at a time.
        row_max, log_sum = stats[0, rows], stats[1, rows]
        factor = (1.0 + 2.0 * z_loss * (row_max + log_sum)) * scale
        grad = logits.sub_(row_max[:, None]).sub_(log_sum[:, None]).exp_().mul_(factor[:, None])
        if label_smoothing:
            grad -= (label_smoothing / vocab_size) * scale[:, None]
        target = torch.where(valid, labels[rows], 0)[:, None]
        grad.scatter_add_(1, target, (-(1.0 - label_smoothing) * scale)[:, None])
        if capped is not None:
            grad *= capped.mul_(capped).neg_().add_(1.0)
        if compute_dx:
            grad_x[rows] = grad.to(x.dtype) @ weight
        if compute_dw:
            # In place from the fp32 dz: no [V, H] temporary per chunk.
            grad_w.addmm_(grad.T, x[rows].to(accum))
        if compute_db:
            grad_b += grad.sum(0)
    return grad_x, (grad_w.to(weight.dtype) if compute_dw else None), (grad_b.to(bias.dtype) if compute_db else None)
