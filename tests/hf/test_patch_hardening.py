"""Setups a real user runs on a patched model: each is either correct or refused with a clear error."""

import copy

import pytest
import torch
import transformers

import fused_train
from fused_train.hf.attention import fused_train_attention
from fused_train.hf.varlen_layout import OncePerForward, varlen_layout
from tests.hf.test_patch_models import make_docs, per_document_loss_and_grads
from tests.hf.tiny_models import COMMON, tiny_model


def sharp(model):
    """Random init gives near-uniform logits, where greedy decoding flips on any rounding; a scaled
    output layer makes the argmax meaningful."""
    with torch.no_grad():
        model.lm_head.weight.mul_(30.0)
    return model.eval()


def prompts(lengths, seed=0):
    generator = torch.Generator().manual_seed(seed)
    width = max(lengths)
    input_ids = torch.zeros(len(lengths), width, dtype=torch.long)
    attention_mask = torch.zeros(len(lengths), width, dtype=torch.long)
    for row, length in enumerate(lengths):
        input_ids[row, width - length :] = torch.randint(3, COMMON["vocab_size"], (length,), generator=generator)
        attention_mask[row, width - length :] = 1
    return dict(input_ids=input_ids, attention_mask=attention_mask)


@pytest.mark.parametrize("model_type", ["llama", "mistral"])
@pytest.mark.parametrize("lengths", [[7], [9, 9], [5, 9]], ids=["batch1", "batch2", "batch2_padded"])
def test_static_cache_generate_equals_stock_sdpa(model_type, lengths):
    """A static cache's keys are its whole capacity, most of it not filled yet (mistral: a sliding
    window layer, rolled once full)."""
    reference = sharp(tiny_model(model_type, attn_implementation="sdpa"))
    patched = fused_train.patch(copy.deepcopy(reference))
    inputs = prompts(lengths)
    kwargs = dict(**inputs, max_new_tokens=10, do_sample=False, pad_token_id=0, output_logits=True,
                  return_dict_in_generate=True)
    with torch.no_grad():
        expected = reference.generate(**kwargs)
        got = patched.generate(**kwargs, cache_implementation="static")
    assert torch.equal(got.sequences, expected.sequences)
    for got_step, expected_step in zip(got.logits, expected.logits):
        torch.testing.assert_close(got_step, expected_step, atol=1e-4, rtol=1e-4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="offloaded caches need a GPU")
@pytest.mark.parametrize("cache_implementation", ["static", "offloaded", "offloaded_static"])
def test_caches_on_the_gpu_generate_as_stock_sdpa(cache_implementation):
    reference = sharp(tiny_model("llama", attn_implementation="sdpa")).cuda()
    patched = fused_train.patch(copy.deepcopy(reference))
    inputs = {name: tensor.cuda() for name, tensor in prompts([5, 9]).items()}
    kwargs = dict(**inputs, max_new_tokens=10, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        expected = reference.generate(**kwargs)
        got = patched.generate(**kwargs, cache_implementation=cache_implementation)
    assert torch.equal(got, expected)


def test_static_cache_forward_without_mask_sees_only_filled_slots():
    reference = tiny_model("llama").eval()
    patched = fused_train.patch(copy.deepcopy(reference))
    input_ids = torch.randint(3, 97, (1, 6), generator=torch.Generator().manual_seed(0))
    cache = transformers.StaticCache(config=patched.config, max_cache_len=32)
    with torch.no_grad():
        expected = reference(input_ids=input_ids).logits
        first = patched(input_ids=input_ids[:, :4], past_key_values=cache).logits
        rest = patched(input_ids=input_ids[:, 4:], past_key_values=cache).logits
    torch.testing.assert_close(torch.cat([first, rest], 1), expected, atol=1e-5, rtol=1e-5)


def test_attention_sinks_are_refused_at_patch_time():
    config = transformers.GptOssConfig(
        **{**COMMON, "num_hidden_layers": 2}, head_dim=16, num_local_experts=2, num_experts_per_tok=1,
        sliding_window=8, layer_types=["sliding_attention", "full_attention"],
    )
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    with pytest.raises(ValueError, match="sinks"):
        fused_train.patch(model)
    assert not fused_train.is_patched(model)


def _attention_inputs():
    generator = torch.Generator().manual_seed(0)
    query = torch.randn(1, 4, 5, 16, generator=generator)
    key, value = (torch.randn(1, 2, 5, 16, generator=generator) for _ in range(2))
    return query, key, value


def test_attention_refuses_a_kwarg_that_carries_meaning():
    module = torch.nn.Module()
    query, key, value = _attention_inputs()
    with pytest.raises(ValueError, match="s_aux"):
        fused_train_attention(module, query, key, value, None, s_aux=torch.zeros(4))


def test_attention_accepts_what_peers_collators_send_without_meaning():
    """TRL's seq_idx and unset (None) kwargs change nothing in the math."""
    module = torch.nn.Module()
    query, key, value = _attention_inputs()
    plain, _ = fused_train_attention(module, query, key, value, None)
    extra, _ = fused_train_attention(module, query, key, value, None, seq_idx=torch.zeros(1, 5, dtype=torch.int32),
                                     s_aux=None)
    torch.testing.assert_close(extra, plain, atol=0, rtol=0)


def test_chunked_attention_is_refused_at_patch_time():
    model = tiny_model("llama")
    model.config.attention_chunk_size = 4
    with pytest.raises(ValueError, match="chunked"):
        fused_train.patch(model)


def test_mask_built_from_extra_mask_functions_is_refused():
    """transformers sets use_vmap when a model ORs/ANDs extra mask functions into the causal mask
    (bidirectional spans of image tokens): the varlen kernel cannot honour those."""
    from transformers.masking_utils import AttentionMaskInterface

    mask_interface = AttentionMaskInterface._global_mapping["fused_train"]
    with pytest.raises(ValueError, match="mask functions"):
        mask_interface(batch_size=1, q_length=4, kv_length=4, use_vmap=True, attention_mask=None)


def test_inference_mode_forward_equals_no_grad():
    patched = fused_train.patch(tiny_model("llama")).eval()
    batch = fused_train.PackedCollator(max_tokens=24)([{"input_ids": doc} for doc in make_docs()])
    with torch.no_grad():
        expected = patched(**batch).logits
    with torch.inference_mode():
        got = patched(**batch).logits
        inputs = prompts([4, 7])
        padded = patched(**inputs).logits
    torch.testing.assert_close(got, expected, atol=0, rtol=0)
    with torch.no_grad():
        torch.testing.assert_close(padded, patched(**inputs).logits, atol=0, rtol=0)


def test_layer_called_without_position_ids_equals_stock():
    """Qwen2-VL and others call their attention layers with position_ids=None (sdpa: causal without a mask)."""
    reference = tiny_model("llama", attn_implementation="sdpa").eval()
    patched = fused_train.patch(copy.deepcopy(reference))
    hidden = torch.randn(2, 6, COMMON["hidden_size"], generator=torch.Generator().manual_seed(0))
    position_ids = torch.arange(6)[None].expand(2, -1)

    def first_layer_attention(model):
        rotary = model.model.rotary_emb(hidden, position_ids)
        return model.model.layers[0].self_attn(hidden, position_embeddings=rotary, attention_mask=None)[0]

    with torch.no_grad():
        torch.testing.assert_close(first_layer_attention(patched), first_layer_attention(reference), atol=1e-5,
                                   rtol=1e-5)


@pytest.mark.parametrize("len_q,len_k", [(6, 6), (1, 6)])
def test_layout_without_position_ids_lives_on_the_query_device(len_q, len_k):
    """On a GPU a CPU layout would fail the kernel launch; "meta" stands for any other device here."""
    layout = varlen_layout(2, len_q, len_k, None, None, None, None, torch.device("meta"))
    assert layout.cu_seqlens_q.device.type == layout.cu_seqlens_k.device.type == "meta"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_layer_called_without_position_ids_on_the_gpu():
    reference = tiny_model("llama", attn_implementation="sdpa").eval().cuda()
    patched = fused_train.patch(copy.deepcopy(reference))
    hidden = torch.randn(2, 6, COMMON["hidden_size"], device="cuda")
    rotary = reference.model.rotary_emb(hidden, torch.arange(6, device="cuda")[None])
    with torch.no_grad():
        got = patched.model.layers[0].self_attn(hidden, position_embeddings=rotary, attention_mask=None)[0]
        expected = reference.model.layers[0].self_attn(hidden, position_embeddings=rotary, attention_mask=None)[0]
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


def test_cu_seq_lens_with_a_padded_mask_is_refused():
    patched = fused_train.patch(tiny_model("llama"))
    batch = fused_train.PackedCollator(max_tokens=24)([{"input_ids": doc} for doc in make_docs()])
    attention_mask = torch.ones_like(batch["input_ids"])
    attention_mask[0, -3:] = 0
    with pytest.raises(ValueError, match="cu_seq_lens"):
        patched(**batch, attention_mask=attention_mask)


def test_cu_seq_lens_with_an_all_ones_mask_is_accepted():
    reference = tiny_model("llama").train()
    patched = fused_train.patch(copy.deepcopy(reference))
    docs = make_docs()
    expected_loss, _ = per_document_loss_and_grads(reference, docs)
    batch = fused_train.PackedCollator(max_tokens=24)([{"input_ids": doc} for doc in docs])
    loss = patched(**batch, attention_mask=torch.ones_like(batch["input_ids"])).loss
    assert abs(loss.item() - expected_loss) <= 1e-5


def test_per_forward_cache_never_pairs_one_key_with_another_value():
    """Two threads sharing the cache: while one compares its key, the other stores its entry. The
    key and value are one entry, so the first gets its own value (or recomputes), never the other's."""
    cache = OncePerForward()

    class Interleaving:
        """A key part whose first comparison lets the other thread store its entry meanwhile."""

        interleaved = False

        def __eq__(self, other):
            if not self.interleaved:
                self.interleaved = True
                cache.get(("b",), lambda: "value of b")
            return other is self

        __hash__ = object.__hash__

    part = Interleaving()
    assert cache.get((part,), lambda: "value of a") == "value of a"
    assert cache.get((part,), lambda: "value of a, recomputed") in ("value of a", "value of a, recomputed")
    assert part.interleaved


def _graph_count(num_layers):
    config = transformers.LlamaConfig(**{**COMMON, "num_hidden_layers": num_layers})
    torch.manual_seed(0)
    model = fused_train.patch(transformers.LlamaForCausalLM(config)).train()
    batch = fused_train.PackedCollator(max_tokens=24)([{"input_ids": doc} for doc in make_docs()])
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(model)(**batch)
    return explanation.graph_count, explanation.break_reasons


def test_compile_graph_count_does_not_grow_with_depth(monkeypatch):
    # A plain CPU (no Triton interpreter): the reference attention must be as opaque to dynamo as
    # the kernel, one custom op per layer, or its per-document loop breaks the graph in every layer.
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    two, reasons = _graph_count(2)
    four, _ = _graph_count(4)
    assert two == four, [reason.reason for reason in reasons]
    assert two == 1, [reason.reason for reason in reasons]
