"""`fused-train eval` on the serving demo's trained tiny model and its three adapters, plus a broken one.

1. The serving demo's model and adapters (bench/serve_demo.py: the tiny Llama trained for
   `--train-seconds` on the embedded sentences corpus; adapters "files", "strings" and "numbers"
   trained for `--adapter-seconds` each on the sentences of their topic), saved under `--work`.
2. A fourth adapter, "broken": "files" with its lora_B weights multiplied by 100, what a bad
   export or a wrong scale would ship.
3. Evaluation data (eval.jsonl beside them): `--per-topic` sentences of each adapter's topic (from
   its training set: this measures what the adapters learned, not generalization), each split at
   a word boundary near its middle into a prompt and its reference; the choices are the reference
   and the second halves of 3 other sentences of the corpus, in a seeded order.
4. `fused-train eval` on all of it with the int8 KV cache and int8 / int4 base variants, the gate
   at `--fail-if-worse` percent: the table, eval.json and eval.png under `--out`. It exits 1 when
   the gate fails, as it should here, on "broken".

    python bench/eval_demo.py                   # CPU: about 3 minutes
"""

import argparse
import json
import os
import random
import re
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if not __package__:  # run as a script: its siblings as `bench.*`, the way tests import them
    sys.path.insert(0, REPO)

from bench.common import BYTE_OFFSET  # noqa: E402
from bench.serve_demo import SLICES, train_adapters, train_model  # noqa: E402
from bench.tiny_serving import make_model_dir  # noqa: E402
from fused_train.cli import main as fused_train_main  # noqa: E402


def split_sentence(text: str) -> tuple[str, str]:
    """(prompt, reference): cut at the space nearest the middle, the space starting the reference."""
    spaces = [m.start() for m in re.finditer(" ", text)]
    cut = min(spaces, key=lambda i: abs(i - len(text) // 2))
    return text[:cut], text[cut:]


def write_data(documents, path, per_topic: int, seed: int) -> int:
    texts = [bytes(t - BYTE_OFFSET for t in doc[1:]).decode("utf-8") for doc in documents]
    texts = [text for text in texts if " " in text.strip()]
    rng = random.Random(seed)
    records = []
    for name, pattern in SLICES.items():
        others = [p for n, p in SLICES.items() if n != name]
        topic = [t for t in texts if re.search(pattern, t, re.I) and not any(re.search(p, t, re.I) for p in others)]
        for text in rng.sample(topic, per_topic):
            prompt, reference = split_sentence(text)
            choices = [reference] + [split_sentence(t)[1] for t in rng.sample(texts, 3)]
            order = list(range(len(choices)))
            rng.shuffle(order)
            records.append(dict(prompt=prompt, reference=reference, choices=[choices[i] for i in order],
                                answer=order.index(0)))  # fmt: skip
    with open(path, "w") as file:
        file.writelines(json.dumps(record) + "\n" for record in records)
    return len(records)


def break_adapter(source: str, target: str, factor: float) -> None:
    """A copy of the adapter in `source` with every lora_B weight multiplied by `factor`."""
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(source, target)
    weights = os.path.join(target, "adapter_model.safetensors")
    tensors = load_file(weights)
    save_file({k: v * factor if ".lora_B." in k else v for k, v in tensors.items()}, weights)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train-seconds", type=float, default=25.0)
    parser.add_argument("--adapter-seconds", type=float, default=8.0)
    parser.add_argument("--per-topic", type=int, default=20, help="evaluation sentences per adapter topic")
    parser.add_argument("--fail-if-worse", type=float, default=3.0, help="the gate, percent")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", help="folder for the model, adapters and data (default: a temporary one)")
    parser.add_argument("--out", default=os.path.join(REPO, "bench", "results", "local", "eval_demo"),
                        help="folder for eval.json and eval.png")  # fmt: skip
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="eval_demo_") as scratch:
        work = args.work or scratch
        base, documents = train_model(args.train_seconds, args.seed)
        model_dir = make_model_dir(os.path.join(work, "model"), base)
        adapters = train_adapters(base, documents, os.path.join(work, "adapters"), args.adapter_seconds, args.seed)
        adapters["broken"] = os.path.join(work, "adapters", "broken")
        break_adapter(adapters["files"], adapters["broken"], 100.0)
        data = os.path.join(work, "eval.jsonl")
        count = write_data(documents, data, args.per_topic, args.seed)
        print(f"{count} examples in {data}", flush=True)
        command = ["eval", "--model", model_dir, "--data", data, "--kv-dtype", "int8", "--quantize-base", "8",
                   "--quantize-base", "4", "--fail-if-worse", str(args.fail_if_worse), "--out", args.out,
                   *[f"--adapter={name}={path}" for name, path in adapters.items()]]  # fmt: skip
        print("fused-train " + " ".join(command), flush=True)
        return fused_train_main(command)


if __name__ == "__main__":
    sys.exit(main())
