"""Serving demo (`make serve-demo`): train a tiny model and three adapters, serve them, load-test the server.

1. The demo's tiny Llama (bench/demo.py) trained for `--train-seconds` on the embedded sentences
   corpus, packed (`fused_train.PackedCollator` + `fused_train.patch`), as bench/demo.py trains it.
2. Three peft LoRA adapters on it, each trained for `--adapter-seconds` on its own slice of the
   corpus (sentences about files, strings and numbers), saved as safetensors.
3. Our server (`python -m fused_train.cli serve`) on 127.0.0.1 over the model and adapters, in a
   subprocess; one greedy completion per model name shows that the adapters answer differently.
4. bench/load_test.py against it for about `--load-seconds` (a sweep of three rates, streamed,
   the three adapters with Zipf popularity): its latency table, JSON and PNG (under `--out`).
The server is stopped at the end, even when a step fails.

    python bench/serve_demo.py                  # under 2.5 minutes on 2 CPU cores
"""

import argparse
import copy
import os
import re
import sys
import tempfile
import time

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if not __package__:  # run as a script: its siblings as `bench.*`, the way tests import them
    sys.path.insert(0, REPO)

from bench import load_test  # noqa: E402
from bench.common import BYTE_OFFSET, LEARNING_RATE, MODEL, PAD_ID, load_documents  # noqa: E402
from bench.tiny_serving import TARGETS, make_model_dir  # noqa: E402

MAX_DOC_TOKENS = 1024
BATCH_SIZE = 48  # sentences per step, as bench/demo.py
# Each adapter learns the sentences that match its pattern (none of the others' sentences).
SLICES = {
    "files": r"\bfiles?\b|\bpaths?\b|director",
    "strings": r"\bstrings?\b|\bcharacters?\b|unicode|encod",
    "numbers": r"\bnumbers?\b|\bintegers?\b|\bfloat|decimal",
}
PROMPT = "The value of"


def train(model, documents, seconds, lr, seed, label) -> tuple[int, float]:
    """Trains `model` (patched, packed rows of BATCH_SIZE documents, epochs reshuffled) for about
    `seconds`; returns (steps, last loss)."""
    from fused_train import PackedCollator

    collate = PackedCollator(max_tokens=MAX_DOC_TOKENS, pad_token_id=PAD_ID, flatten=True)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    generator = torch.Generator().manual_seed(seed)
    order, steps, loss = [], 0, float("nan")
    model.train()
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        if len(order) < BATCH_SIZE:
            order += torch.randperm(len(documents), generator=generator).tolist()
        batch, order = order[:BATCH_SIZE], order[BATCH_SIZE:]
        loss = model(**collate([{"input_ids": documents[i]} for i in batch])).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        steps, loss = steps + 1, loss.item()
        if steps % 10 == 0:
            print(f"  {label}: step {steps}, loss {loss:.3f}", flush=True)
    model.eval()
    return steps, loss


def train_model(seconds, seed):
    import transformers

    import fused_train

    documents, _ = load_documents(MAX_DOC_TOKENS, "sentences")
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(**MODEL, max_position_embeddings=2048)
    model = transformers.LlamaForCausalLM._from_config(config, attn_implementation="sdpa")
    fused_train.patch(model)
    steps, loss = train(model, documents, seconds, LEARNING_RATE, seed, "base model")
    print(f"base model: {steps} steps on {len(documents)} sentences, loss {loss:.3f}", flush=True)
    return fused_train.unpatch(model), documents


def train_adapters(base, documents, folder, seconds, seed) -> dict[str, str]:
    from peft import LoraConfig, get_peft_model

    import fused_train

    texts = [bytes(t - BYTE_OFFSET for t in doc[1:]).decode("utf-8") for doc in documents]
    paths = {}
    for index, (name, pattern) in enumerate(SLICES.items()):
        others = [p for n, p in SLICES.items() if n != name]
        chosen = [doc for doc, text in zip(documents, texts)
                  if re.search(pattern, text, re.I) and not any(re.search(p, text, re.I) for p in others)]  # fmt: skip
        model = get_peft_model(copy.deepcopy(base), LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS))
        fused_train.patch(model)
        steps, loss = train(model, chosen, seconds, 4 * LEARNING_RATE, seed + 1 + index, f"adapter {name}")
        fused_train.unpatch(model)
        paths[name] = os.path.join(folder, name)
        model.save_pretrained(paths[name])  # adapter_model.safetensors
        print(f"adapter {name!r}: {steps} steps on {len(chosen)} sentences, loss {loss:.3f}", flush=True)
    return paths


def show_completions(base_url, names) -> None:
    import httpx

    for name in names:
        body = dict(model=name, prompt=PROMPT, max_tokens=40, temperature=0)
        text = httpx.post(f"{base_url}/v1/completions", json=body, timeout=60).json()["choices"][0]["text"]
        print(f"  {name:>8}: {PROMPT}{text!r}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train-seconds", type=float, default=25.0)
    parser.add_argument("--adapter-seconds", type=float, default=8.0)
    parser.add_argument("--load-seconds", type=float, default=30.0, help="the load test's sending time, all rates")
    parser.add_argument("--rates", default="1,2,4", help="the load test's request rates")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=os.path.join(REPO, "bench", "results", "local"), help="JSON and PNG folder")
    args = parser.parse_args(argv)
    rates = load_test.parse_rates(args.rates)

    with tempfile.TemporaryDirectory(prefix="serve_demo_") as folder:
        base, documents = train_model(args.train_seconds, args.seed)
        model_dir = make_model_dir(os.path.join(folder, "model"), base)
        adapters = train_adapters(base, documents, os.path.join(folder, "adapters"), args.adapter_seconds, args.seed)
        port = load_test.free_port()
        command = load_test.server_command("ours", model_dir, adapters, port, max_loras=len(adapters))
        env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
        url = f"http://127.0.0.1:{port}"
        print(f"starting our server on {url} ...", flush=True)
        with load_test.ServerProcess(command, f"{url}/health", os.path.join(folder, "server.log"), env):
            print("greedy completions, one per model name:")
            show_completions(url, [load_test.SERVED_MODEL_NAME, *adapters])
            load_test.main(["--base-url", url, "--num-adapters", str(len(adapters)), "--rates", args.rates,
                            "--duration", str(args.load_seconds / len(rates)), "--num-requests", "1000",
                            "--max-tokens", "32", "--slo-ttft-ms", "1000", "--slo-tpot-ms", "100",
                            "--label", "serve_demo", "--out", args.out])  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
