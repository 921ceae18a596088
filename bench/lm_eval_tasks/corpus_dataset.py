"""The documents of the corpus tasks here (corpus_choice.yaml, corpus_next_word.yaml): corpus.jsonl beside
this file, as lm-evaluation-harness's `custom_dataset`, so the tasks read it wherever they are run from."""

from pathlib import Path

import datasets

DATA = Path(__file__).resolve().parent / "corpus.jsonl"


def load(**metadata) -> datasets.DatasetDict:
    # lm-eval passes the task's metadata (its version, the model's arguments): nothing here depends on it.
    return datasets.DatasetDict({"test": datasets.Dataset.from_json(str(DATA))})
