"""Where no Triton wheel exists (macOS), the package imports and runs its PyTorch reference path.

The test runs this file as a script in a fresh Python whose `import triton` fails as it does where
Triton is not installed (a None entry in sys.modules, set before anything is imported), without
the TRITON_INTERPRET that tests/conftest.py sets; the script raises on any difference.
"""

import os
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


def test_package_imports_and_runs_without_triton():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    done = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]


def _run_without_triton():
    import copy

    import torch
    import torch.nn.functional as F

    import fused_train
    from fused_train.ops import dispatch
    from fused_train.ops.int8_kv import int8_decode_attention, quantize_kv_append
    from fused_train.ops.paged_kv import paged_decode_attention, write_kv_pages
    from tests.hf.tiny_models import tiny_model

    torch.manual_seed(0)
    assert not dispatch.HAS_TRITON and not dispatch.triton_runs_on(torch.ones(1))

    # varlen attention: GQA, causal, two documents, and its backward.
    lengths, num_heads, num_kv_heads, head_dim = [5, 7], 4, 2, 16
    q = torch.randn(sum(lengths), num_heads, head_dim, requires_grad=True)
    k, v = (torch.randn(sum(lengths), num_kv_heads, head_dim, requires_grad=True) for _ in range(2))
    cu_seqlens = torch.tensor([0, 5, 12], dtype=torch.int32)
    out = fused_train.varlen_attention(q, k, v, cu_seqlens, cu_seqlens, max(lengths), max(lengths), causal=True)
    expected = torch.cat([
        F.scaled_dot_product_attention(
            q_doc.transpose(0, 1), k_doc.transpose(0, 1), v_doc.transpose(0, 1), is_causal=True, enable_gqa=True
        ).transpose(0, 1)
        for q_doc, k_doc, v_doc in zip(q.split(lengths), k.split(lengths), v.split(lengths))
    ])  # fmt: skip
    torch.testing.assert_close(out, expected)
    out.sum().backward()
    assert all(t.grad is not None and torch.isfinite(t.grad).all() for t in (q, k, v))

    # Fused LoRA linear.
    x, weight = torch.randn(6, 16), torch.randn(8, 16)
    lora_a, lora_b = torch.randn(4, 16), torch.randn(8, 4)
    y = fused_train.lora_linear(x, weight, lora_a, lora_b, 2.0)
    torch.testing.assert_close(y, x @ weight.T + 2.0 * (x @ lora_a.T) @ lora_b.T)

    # Multi-LoRA linear: unsorted slots, -1 for the base alone, a rank below r_max.
    token_slots = torch.tensor([1, -1, 0, 1], dtype=torch.int32)
    stacked_a, stacked_b = torch.randn(2, 4, 16), torch.randn(2, 8, 4)
    scalings, ranks = torch.tensor([2.0, 0.5]), torch.tensor([4, 2], dtype=torch.int32)
    tokens = torch.randn(4, 16)
    y = fused_train.multi_lora_linear(tokens, weight, stacked_a, stacked_b, token_slots, scalings, ranks)
    for row, slot in enumerate(token_slots.tolist()):
        expected_row = tokens[row] @ weight.T
        if slot >= 0:
            rank = int(ranks[slot])
            expected_row += scalings[slot] * (tokens[row] @ stacked_a[slot, :rank].T) @ stacked_b[slot, :, :rank].T
        torch.testing.assert_close(y[row], expected_row)

    # Fused linear cross-entropy (its chunked reference) and its gradients, against the logits path.
    hidden = torch.randn(2, 7, 16, requires_grad=True)
    lm_weight = torch.randn(50, 16, requires_grad=True)
    labels = torch.randint(0, 50, (2, 7))
    labels[1, :3] = -100
    loss = fused_train.linear_cross_entropy(hidden, lm_weight, labels, softcap=5.0)
    grads = torch.autograd.grad(loss, [hidden, lm_weight])
    logits = 5.0 * torch.tanh(F.linear(hidden, lm_weight) / 5.0)
    expected_loss = F.cross_entropy(logits.flatten(0, 1), labels.flatten())
    torch.testing.assert_close(loss, expected_loss)
    for got, expected in zip(grads, torch.autograd.grad(expected_loss, [hidden, lm_weight])):
        torch.testing.assert_close(got, expected)

    # A patched tiny Llama on a packed batch: the per-document loss of the stock model.
    reference = tiny_model("llama")
    patched = fused_train.patch(copy.deepcopy(reference))
    docs = [torch.randint(3, 97, (n,)) for n in (9, 1, 13, 6)]
    with torch.no_grad():
        targets = sum(len(doc) - 1 for doc in docs)
        expected_loss = sum(reference(input_ids=doc[None], labels=doc[None]).loss * (len(doc) - 1) / targets
                            for doc in docs if len(doc) > 1)
        batch = fused_train.PackedCollator(max_tokens=16)([{"input_ids": doc} for doc in docs])
        torch.testing.assert_close(patched(**batch).loss, expected_loss)
    fused_train.patch(patched, fused_loss=True).train()
    torch.testing.assert_close(patched(**batch).loss, expected_loss)

    # The int8 KV cache ops: quantize-on-append, then one query over the cache.
    keys, values = torch.randn(2, 1, 2, 5, 16).unbind(0)
    caches = [(torch.zeros(1, 2, 8, 16, dtype=torch.int8), torch.zeros(1, 2, 8)) for _ in range(2)]
    for new, (data, scale) in zip((keys, values), caches):
        quantize_kv_append(new, data, scale, 0)
        dequantized = data[:, :, :5].float() * scale[:, :, :5, None]
        assert ((dequantized - new).abs() <= scale[:, :, :5, None] / 2 + 1e-6).all()
    (k_data, k_scale), (v_data, v_scale) = caches
    query = torch.randn(1, 4, 1, 16)
    out = int8_decode_attention(query, k_data, k_scale, v_data, v_scale, kv_len=5)
    expected = F.scaled_dot_product_attention(
        query, k_data[:, :, :5].float() * k_scale[:, :, :5, None], v_data[:, :, :5].float() * v_scale[:, :, :5, None],
        enable_gqa=True,
    )  # fmt: skip
    torch.testing.assert_close(out, expected)

    # The paged KV cache ops: the same tokens written into page 1 of a pool, then the same query over them.
    pages = [torch.zeros(2, 2, 8, 16, dtype=torch.int8) for _ in range(2)]
    page_scales = [torch.zeros(2, 2, 8) for _ in range(2)]
    write_kv_pages(keys[0].transpose(0, 1), values[0].transpose(0, 1), *pages, torch.arange(8, 13),
                   k_scales=page_scales[0], v_scales=page_scales[1])
    assert torch.equal(pages[0][1, :, :5], k_data[0, :, :5])
    assert torch.equal(page_scales[1][1, :, :5], v_scale[0, :, :5])
    page_table, kv_lens = torch.tensor([[1]], dtype=torch.int32), torch.tensor([5], dtype=torch.int32)
    out = paged_decode_attention(query[:, :, 0], *pages, page_table, kv_lens, k_scales=page_scales[0],
                                 v_scales=page_scales[1])
    torch.testing.assert_close(out, expected[:, :, 0])
    assert sys.modules["triton"] is None and not any(name.startswith("triton.") for name in sys.modules)


if __name__ == "__main__":
    # As where Triton is not installed: `import triton` raises ModuleNotFoundError, and
    # importlib.util.find_spec("triton") is None.
    sys.modules["triton"] = None
    _run_without_triton()
