"""What the benches, the demos and their tests share: the embedded corpora and their byte tokens,
the tiny Llama they train, seeded batches and HF-style padded collation, one timer, the device's
measured copy bandwidth, the CPU's name, and pyplot and the JSON + chart writer for the reports.

The corpora (bench/data/) are tokenized by bytes: ids = [BOS=1] + [byte + 3 ...], pad 0, EOS 2,
vocabulary 259 (bench/demo.py describes both).
"""

import functools
import gzip
import json
import platform
import re
import time
from dataclasses import dataclass
from pathlib import Path

import torch

BOS_ID, PAD_ID, BYTE_OFFSET, VOCAB_SIZE = 1, 0, 3, 259
# The tiny Llama of the demo, the serving demo, the evals and the end-to-end benches.
MODEL = dict(
    vocab_size=VOCAB_SIZE,
    hidden_size=128,
    intermediate_size=352,
    num_hidden_layers=4,
    num_attention_heads=2,
    num_key_value_heads=2,
    pad_token_id=PAD_ID,
    bos_token_id=BOS_ID,
    eos_token_id=2,
    tie_word_embeddings=False,
    # With use_cache=True in train mode, transformers 5.x builds an (empty) cache and then skips the
    # packed-sequence detection from position_ids, so stock sdpa would let the flattened documents
    # attend to each other. The flattening anchor is only correct with use_cache=False.
    use_cache=False,
)
# The demo's AdamW learning rate, which the serving demo trains its model with too.
LEARNING_RATE = 2e-3

REPO = Path(__file__).resolve().parent.parent
DATA = REPO / "bench" / "data"


@dataclass(frozen=True)
class Corpus:
    name: str
    path: Path
    description: str
    batch_size: int  # documents per step by default


CORPORA = {
    corpus.name: corpus
    for corpus in (
        Corpus("docstrings", DATA / "stdlib_docstrings.json.gz", "stdlib docstrings", 16),
        Corpus("sentences", DATA / "stdlib_sentences.json.gz", "sentences of stdlib docstrings", 48),
    )
}


def encode(text: str) -> list[int]:
    return [BOS_ID] + [byte + BYTE_OFFSET for byte in text.encode("utf-8")]


def load_documents(max_doc_tokens: int, corpus: str = "docstrings") -> tuple[list[list[int]], dict]:
    """The corpus's documents of at most `max_doc_tokens` tokens; longer ones are dropped, never cut."""
    with gzip.open(CORPORA[corpus].path, "rt", encoding="utf-8") as f:
        texts = json.load(f)
    documents = [encode(text) for text in texts]
    kept = [doc for doc in documents if len(doc) <= max_doc_tokens]
    info = {
        "name": corpus,
        "description": CORPORA[corpus].description,
        "documents_in_corpus": len(documents),
        "documents_kept": len(kept),
        "max_doc_tokens": max_doc_tokens,
    }
    return kept, info


def docstring_sentences(docstrings: list[str]) -> list[str]:
    """The sentences corpus: every third distinct sentence of the docstrings' prose paragraphs.

    A paragraph (lines between blank lines) is prose when none of its lines is indented or a
    doctest; code, tables and argument lists are left out. Its lines are joined by spaces and cut
    after `.`, `!` or `?` followed by a space and a capital letter.
    """
    sentences = {}
    for docstring in docstrings:
        for paragraph in docstring.split("\n\n"):
            lines = paragraph.splitlines()
            if not lines or any(line.startswith((" ", "\t", ">>>")) for line in lines):
                continue
            prose = " ".join(line.strip() for line in lines)
            sentences.update(dict.fromkeys(s for s in re.split(r"(?<=[.!?])\s+(?=[A-Z])", prose) if s))
    return list(sentences)[::3]


def write_sentences_corpus(path: Path = CORPORA["sentences"].path) -> None:
    """Writes the sentences corpus from the docstrings corpus (`docstring_sentences`)."""
    with gzip.open(CORPORA["docstrings"].path, "rt", encoding="utf-8") as f:
        sentences = docstring_sentences(json.load(f))
    path.write_bytes(gzip.compress(json.dumps(sentences, ensure_ascii=False).encode("utf-8"), mtime=0))


def make_timer(device, cpu_repeats):
    """`timer(fn) -> ms`: `triton.testing.do_bench`'s median on a GPU; on a CPU the best of
    `cpu_repeats` runs after one warm-up (slower runs measure the machine's other load)."""
    if device == "cuda":
        import triton.testing

        return lambda fn: triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")

    def best_of(fn):
        fn()
        times = []
        for _ in range(cpu_repeats):
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) * 1e3)
        return min(times)

    return best_of


def measure_copy_bandwidth(timer):
    """GB/s of a 1 GiB device-to-device copy (it reads and writes the bytes: 2 * bytes / time)."""
    nbytes = 1 << 30
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = timer(functools.partial(dst.copy_, src))
    del src, dst
    torch.cuda.empty_cache()
    return 2 * nbytes / ms / 1e6


def plan_batches(num_documents: int, batch_size: int, steps: int, seed: int) -> list[list[int]]:
    """`steps` disjoint batches of `batch_size` document indices, in a seeded random order."""
    if steps * batch_size > num_documents:
        raise ValueError(f"steps * batch_size = {steps * batch_size} exceeds the {num_documents} documents kept")
    order = torch.randperm(num_documents, generator=torch.Generator().manual_seed(seed)).tolist()
    return [order[i * batch_size : (i + 1) * batch_size] for i in range(steps)]


def collate_padded(documents):
    """What HF's dynamic padding gives a causal LM: right padding to the longest, labels -100 there."""
    width = max(map(len, documents))
    input_ids = torch.full((len(documents), width), PAD_ID, dtype=torch.long)
    attention_mask = torch.zeros((len(documents), width), dtype=torch.long)
    for row, doc in enumerate(documents):
        input_ids[row, : len(doc)] = torch.tensor(doc)
        attention_mask[row, : len(doc)] = 1
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def cpu_model() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def pyplot():
    """matplotlib's pyplot on the Agg backend: the charts are files, never windows."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def write_report(report: dict, stem: str, chart) -> None:
    """`stem`.json holding `report`, and `stem`.png drawn by `chart(plt, rows, path, report)` from the
    report's rows whose status is "ok" (no chart when none is)."""
    with open(stem + ".json", "w") as f:
        json.dump(report, f, indent=1)
    ok = [row for row in report["rows"] if row["status"] == "ok"]
    if ok:
        chart(pyplot(), ok, stem + ".png", report)
