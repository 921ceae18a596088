"""A servable tiny model on disk: the demo's tiny Llama, a byte-level tokenizer with a chat template,
and peft LoRA adapters (safetensors), as `fused-train serve --model DIR --adapter NAME=DIR` reads them.

The tokenizer is a real transformers tokenizer (`PreTrainedTokenizerFast`) that encodes exactly as
`bench.common.encode` does: [BOS=1] + [byte + 3 ...], EOS 2, pad 0, vocabulary 259. So a model trained by
the demo's code serves the same ids, and the server's chat template, decoding and stop strings run
through the same tokenizer API as for any Hugging Face model.

    model_dir = make_model_dir("/tmp/tiny")                       # random init, seed 0
    paths = make_adapters(model_dir, "/tmp/adapters", {"a": 8, "b": 16})
"""

import os

import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

from bench.common import BOS_ID, BYTE_OFFSET, MODEL, PAD_ID

EOS_ID = MODEL["eos_token_id"]
SPECIAL_TOKENS = {PAD_ID: "<pad>", BOS_ID: "<s>", EOS_ID: "</s>"}
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}\n"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _bytes_to_unicode() -> dict[int, str]:
    """The byte -> printable character map of byte-level BPE (GPT-2's): printable Latin-1 bytes map to
    themselves, the rest to code points from 256 up, so every byte is one character of the vocabulary."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            chars[byte] = chr(byte)
        else:
            chars[byte] = chr(256 + extra)
            extra += 1
    return chars


def make_tokenizer() -> transformers.PreTrainedTokenizerFast:
    """One token per UTF-8 byte (id byte + 3), `<s>` prepended, as `bench.common.encode`."""
    vocab = {token: token_id for token_id, token in SPECIAL_TOKENS.items()}
    vocab |= {char: byte + BYTE_OFFSET for byte, char in _bytes_to_unicode().items()}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", BOS_ID)]
    )
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def make_model(seed: int = 0) -> transformers.LlamaForCausalLM:
    """The demo's tiny Llama (hidden 128, 4 layers), random init from `seed`."""
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(**MODEL, max_position_embeddings=2048)
    return transformers.LlamaForCausalLM(config).eval()


def make_model_dir(path, model=None, seed: int = 0) -> str:
    """`model` (or a fresh `make_model(seed)`) and the byte tokenizer saved as a Hugging Face model
    directory; returns `path`."""
    model = make_model(seed) if model is None else model
    model.generation_config.eos_token_id = EOS_ID
    model.save_pretrained(path)
    make_tokenizer().save_pretrained(path)
    return str(path)


def make_adapters(model_dir, folder, ranks: dict[str, int], seed: int = 100, scale: float = 0.5) -> dict[str, str]:
    """Random peft LoRA adapters of the model in `model_dir`, one directory per name under `folder`
    (adapter_config.json + adapter_model.safetensors, as peft saves them), on all seven projections.
    `ranks` maps name -> rank; `scale` sizes B so that each adapter visibly changes the greedy output."""
    from peft import LoraConfig
    from safetensors.torch import save_file

    config = transformers.AutoConfig.from_pretrained(model_dir)
    with torch.device("meta"):
        linears = [(name, module) for name, module in transformers.LlamaForCausalLM(config).named_modules()
                   if name.rsplit(".", 1)[-1] in TARGETS]  # fmt: skip
    generator = torch.Generator().manual_seed(seed)
    paths = {}
    for name, rank in ranks.items():
        path = paths[name] = os.path.join(folder, name)
        LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=TARGETS).save_pretrained(path)
        tensors = {}
        for module_name, module in linears:
            lora_a = torch.randn(rank, module.in_features, generator=generator) / module.in_features**0.5
            lora_b = torch.randn(module.out_features, rank, generator=generator) * scale / rank**0.5
            tensors[f"base_model.model.{module_name}.lora_A.weight"] = lora_a
            tensors[f"base_model.model.{module_name}.lora_B.weight"] = lora_b
        save_file(tensors, os.path.join(path, "adapter_model.safetensors"))
    return paths
