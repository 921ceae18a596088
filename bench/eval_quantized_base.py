"""Quality of LoRA training over an int8 or int4 frozen base (`fused_train.quantize_base`).

What quantizing the frozen base costs in quality, and what LoRA training on top of it recovers:

1. The demo's tiny Llama (byte tokenizer, stdlib docstrings; hidden 128, MLP 352) is trained packed
   and patched on most of the corpus, exactly as bench/eval_kv_quality.py trains it; a seeded set
   of documents is held out and never trained on.
2. For each base, float32 (as trained), int8 and int4: peft LoRA on the 7 projections (r=8,
   alpha=16, dropout 0.05, the same initialization for every base), `quantize_base(model, bits)`
   on those projections (embeddings and lm_head stay float, as in QLoRA), `fused_train.patch`.
   Held-out perplexity before LoRA training (the cost of quantizing) and after `--lora-steps`
   steps of LoRA training on the training documents (same batches for every base; AdamW, warm-up
   then cosine, gradient norm clipped to 1 as transformers' Trainer does).
3. Bytes of the 7 projections' weights in each format, against bfloat16.

Perplexity is `fused-train eval`'s (`fused_train.evaluation`), through the serving `Engine`: the
pretrained model and the three LoRA adapters are saved, and evaluated under its variants full,
base_int8 and base_int4 (which quantize the same 7 projections the same way), each on the first L
tokens of every held-out document of at least L tokens (a reference after the BOS prompt, cut back
to a whole character where L falls inside one). "Before LoRA" is the base model's row of each
variant, "after LoRA" the row of the adapter trained over that base. The LoRA training and the
bytes have no counterpart in the tool and stay here. On a plain CPU the fused LoRA path runs its
PyTorch reference (dequantize, then matmul), numerically what the kernel computes; on a GPU the
Triton kernels run. Writes quantized_base.json and quantized_base.png under bench/results/ or `--out`.

    python bench/eval_quantized_base.py            # CPU: several minutes
    python bench/eval_quantized_base.py --quick    # smoke run
"""

import argparse
import copy
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from tqdm import tqdm

REPO = Path(__file__).resolve().parent.parent
if not __package__:  # run as a script: its siblings as `bench.*`, the way tests import them
    sys.path.insert(0, str(REPO))

import fused_train  # noqa: E402
from bench.common import BYTE_OFFSET, pyplot  # noqa: E402
from bench.eval_kv_quality import (  # noqa: E402
    add_training_arguments,
    learning_rate,
    packed_collator,
    perplexity_documents,
    split_documents,
    train,
    train_step,
)
from bench.tiny_serving import make_model_dir  # noqa: E402
from fused_train import evaluation  # noqa: E402
from fused_train.hf.peft_lora import patch_lora_layers  # noqa: E402

BASES = {"float32": None, "int8": 8, "int4": 4}
VARIANT_OF = {"float32": "full", "int8": "base_int8", "int4": "base_int4"}  # fused_train.evaluation.VARIANTS
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
DEFAULTS = dict(steps=400, batch_size=16, lora_steps=200, ppl_len=256, ppl_docs=64)
QUICK = dict(steps=12, batch_size=8, lora_steps=6, ppl_len=64, ppl_docs=8)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_training_arguments(parser, DEFAULTS, QUICK)  # pretraining; LoRA steps take --batch-size too
    parser.add_argument("--lora-steps", type=int,
                        help=f"LoRA training steps per base (default {DEFAULTS['lora_steps']})")  # fmt: skip
    parser.add_argument("--lora-lr", type=float, default=2e-3, help="LoRA AdamW peak learning rate")
    parser.add_argument("--seed", type=int, default=0, help="seed of the pretrained model (initialization, data order)")
    parser.add_argument("--ppl-len", type=int, help="L: tokens per perplexity document")
    parser.add_argument("--ppl-docs", type=int, help="at most this many perplexity documents (one batch)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: steady on a shared machine)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results",
                        help="folder for quantized_base.json/.png")  # fmt: skip
    args = parser.parse_args(argv)
    for key, value in (QUICK if args.quick else DEFAULTS).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def projection_bytes(model):
    """Bytes of the 7 projections' stored weights (with their scales and offsets), and of the same
    weights in bfloat16."""
    stored = bf16 = 0
    for name, module in model.named_modules():
        if name.endswith("base_layer"):
            stored += sum(t.nbytes for key, t in module.state_dict().items() if key.startswith("weight"))
            bf16 += 2 * module.out_features * module.in_features
    return stored, bf16


def lora_train(model, documents, args, device):
    """`args.lora_steps` steps of LoRA training, packed; returns the losses."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lora_lr)
    collate = packed_collator(args)
    order = torch.randperm(len(documents), generator=torch.Generator().manual_seed(args.seed + 2)).tolist()
    losses = []
    model.train()
    for step in tqdm(range(args.lora_steps), desc="LoRA training", unit="step", leave=False):
        start = step * args.batch_size % len(order)
        batch = [documents[order[(start + i) % len(order)]] for i in range(args.batch_size)]
        lr = learning_rate(step, args.lora_steps, args.lora_lr)
        losses.append(train_step(model, optimizer, collate(batch), lr, device))
    model.eval()
    return losses


def train_lora(pretrained, bits, train_docs, args, device, path):
    """LoRA trained over the base quantized to `bits` (None: float), saved to `path`; its record."""
    model = copy.deepcopy(pretrained)
    torch.manual_seed(args.seed + 1)  # the same LoRA initialization (and dropout masks) for every base
    config = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05, target_modules=TARGETS)
    model = get_peft_model(model, config)
    if bits is not None:
        fused_train.quantize_base(model, bits=bits)
    fused_train.patch(model)
    report = patch_lora_layers(model)  # already patched: only the report
    stored, bf16 = projection_bytes(model)
    start = time.perf_counter()
    losses = lora_train(model, train_docs, args, device)
    fused_train.unpatch(model).save_pretrained(path)
    return dict(
        bits=bits,
        fused_layers=report.num_fused,
        projection_bytes=stored,
        projection_bytes_over_bfloat16=stored / bf16,
        lora_seconds=time.perf_counter() - start,
        lora_losses=losses,
    )


def perplexity_examples(documents, length):
    """`fused_train.evaluation` examples: each document's first `length` tokens (BOS and bytes)
    as a reference after the empty prompt (the tokenizer's BOS), cut back to a whole character."""
    texts = [bytes(t - BYTE_OFFSET for t in doc[1:length]).decode("utf-8", errors="ignore") for doc in documents]
    return [evaluation.Example(line, "", text) for line, text in enumerate(texts, 1)]


def plot(report, path):
    plt = pyplot()

    fig, (ax_ppl, ax_loss) = plt.subplots(1, 2, figsize=(11, 4))
    names = list(report["bases"])
    width = 0.38
    for i, key in enumerate(("ppl_before_lora", "ppl_after_lora")):
        values = [report["bases"][name][key] for name in names]
        label = key.replace("_lora", " LoRA").replace("_", " ")
        ax_ppl.bar([j + (i - 0.5) * width for j in range(len(names))], values, width, label=label)
    ax_ppl.set_xticks(range(len(names)), [f"{n}\n{report['bases'][n]['projection_bytes_over_bfloat16']:.2f}x bf16 bytes"
                                          for n in names])
    low = min(min(b["ppl_before_lora"], b["ppl_after_lora"]) for b in report["bases"].values())
    ax_ppl.set_ylim(low * 0.95, None)
    ax_ppl.set_ylabel("held-out perplexity (lower is better)")
    ax_ppl.legend()
    # The loss curves overlap at this scale: their difference from float32's is what shows.
    reference = report["bases"]["float32"]["lora_losses"]
    for name in names[1:]:
        difference = [a - b for a, b in zip(report["bases"][name]["lora_losses"], reference)]
        ax_loss.plot(difference, label=f"{name} - float32", linewidth=1)
    ax_loss.axhline(0, color="gray", linewidth=0.5)
    ax_loss.set_xlabel("LoRA step (same batches for every base)")
    ax_loss.set_ylabel("training loss difference")
    ax_loss.legend()
    fig.suptitle("LoRA over a quantized frozen base (tiny Llama, held-out documents)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    train_docs, held_out, corpus = split_documents(args)
    chosen, _ = perplexity_documents(held_out, args)
    examples = perplexity_examples(chosen, args.ppl_len)
    pretrained, training = train(args, args.seed, train_docs, device)
    fused_train.unpatch(pretrained)  # each base is wrapped in peft, then patched whole
    with tempfile.TemporaryDirectory(prefix="eval_quantized_base_") as folder:
        model_dir = make_model_dir(Path(folder) / "model", pretrained)
        adapters = {f"lora_{name}": str(Path(folder) / f"lora_{name}") for name in BASES}
        bases = {name: train_lora(pretrained, bits, train_docs, args, device, adapters[f"lora_{name}"])
                 for name, bits in BASES.items()}  # fmt: skip
        results = evaluation.evaluate(model_dir, adapters, examples, list(VARIANT_OF.values()), generate=False,
                                      device=device, dtype="float32")  # fmt: skip
    for name, base in bases.items():
        rows = results[VARIANT_OF[name]]
        base["ppl_before_lora"] = rows[evaluation.BASE]["perplexity"]
        base["ppl_after_lora"] = rows[f"lora_{name}"]["perplexity"]
        print(f"{name}: perplexity {base['ppl_before_lora']:.4f} before LoRA, "
              f"{base['ppl_after_lora']:.4f} after {args.lora_steps} steps")
    reference = bases["float32"]
    for base in bases.values():
        base["ppl_rel_diff_before_lora"] = base["ppl_before_lora"] / reference["ppl_before_lora"] - 1
        base["ppl_rel_diff_after_lora"] = base["ppl_after_lora"] / reference["ppl_after_lora"] - 1
    del training["losses"]
    report = dict(
        command=" ".join(["python bench/eval_quantized_base.py", *(argv if argv is not None else sys.argv[1:])]),
        device=str(device),
        settings={k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        corpus=corpus,
        pretraining=training,
        perplexity_documents=dict(count=len(chosen), L=args.ppl_len,
                                  evaluated_by="fused_train.evaluation (fused-train eval) through the Engine",
                                  reference_tokens=sum(len(example.reference.encode()) for example in examples)),
        lora=dict(r=8, alpha=16, dropout=0.05, targets=TARGETS, steps=args.lora_steps, lr=args.lora_lr),
        bases=bases,
    )
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"quantized_base{'_quick' if args.quick else ''}"
    path.with_suffix(".json").write_text(json.dumps(report, indent=1))
    plot(report, path.with_suffix(".png"))
    print(f"{'base':>8} {'bytes/bf16':>10} {'ppl before':>11} {'vs float':>9} {'ppl after':>10} {'vs float':>9}")
    for name, base in bases.items():
        print(f"{name:>8} {base['projection_bytes_over_bfloat16']:>10.3f} {base['ppl_before_lora']:>11.4f} "
              f"{base['ppl_rel_diff_before_lora']:>+9.2%} {base['ppl_after_lora']:>10.4f} "
              f"{base['ppl_rel_diff_after_lora']:>+9.2%}")  # fmt: skip
    print(f"wrote {path}.json and {path}.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
