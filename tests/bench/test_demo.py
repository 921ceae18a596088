"""The demo's three runs (padded, flattening, packed) must train identically, step by step, on each corpus.

They see the same documents from the same init; only the batch layout and the attention differ.
Equal losses at every step check the whole packed path end to end: collator labels and position
ids, document boundaries in the patched attention, and its gradients (a wrong gradient shows in
the next step's loss).
"""

import gzip
import json

from bench import common, demo


def test_three_runs_train_identically_on_both_corpora_and_write_results(tmp_path, monkeypatch):
    # The demo exercises what a user's CPU runs (the PyTorch attention path), not the Triton
    # interpreter that tests/conftest.py switches on; the kernels have tests of their own.
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    steps = 4
    exit_code = demo.main(
        [f"--steps={steps}", "--batch-size=4", "--max-doc-tokens=160", f"--out={tmp_path}", "--in-process"]
    )
    assert exit_code == 0

    report = json.loads((tmp_path / "demo.json").read_text())
    assert (tmp_path / "demo.png").stat().st_size > 0
    assert list(report["corpora"]) == list(common.CORPORA)
    for corpus in report["corpora"].values():
        runs = corpus["runs"]
        padded = runs["padded"]
        for name in demo.RUNS:
            run = runs[name]
            assert len(run["losses"]) == steps
            assert run["real_tokens"] == padded["real_tokens"], "every run must see the same documents"
            for step, (loss, expected) in enumerate(zip(run["losses"], padded["losses"])):
                assert abs(loss - expected) <= 1e-5 * max(1.0, abs(expected)), (name, step, loss, expected)
        assert padded["padding_fraction"] > 0
        assert runs["flattening"]["padding_fraction"] == 0
        assert runs["packed"]["padding_fraction"] == 0
        assert corpus["comparison"]["padded_tokens_over_real_tokens"] > 1


def test_unequal_losses_fail_the_demo(tmp_path, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    train_all = demo.train_all

    def packed_off_by_a_little(args):
        results = train_all(args)
        results["sentences"]["packed"]["losses"][-1] += 10 * demo.LOSS_TOLERANCE
        return results

    monkeypatch.setattr(demo, "train_all", packed_off_by_a_little)
    argv = ["--steps=3", "--batch-size=2", "--max-doc-tokens=64", f"--out={tmp_path}", "--in-process"]
    assert demo.main(argv + ["--corpus", "sentences"]) == 1


def test_results_go_to_an_untracked_folder_by_default():
    args = demo.parse_args([])
    assert args.out == common.REPO / "bench" / "results" / "local"
    assert "bench/results/local/" in (common.REPO / ".gitignore").read_text().splitlines()


def test_sentences_corpus_is_made_from_the_docstrings_corpus(tmp_path):
    common.write_sentences_corpus(tmp_path / "sentences.json.gz")
    with gzip.open(tmp_path / "sentences.json.gz", "rt", encoding="utf-8") as f:
        made = json.load(f)
    with gzip.open(common.CORPORA["sentences"].path, "rt", encoding="utf-8") as f:
        assert json.load(f) == made
    assert all("\n" not in sentence for sentence in made)
    docstring = "One line. Two words!\nStill two.\n\n    code = 1\n\nThird? Yes."
    assert common.docstring_sentences([docstring]) == ["One line.", "Third?"]


def test_run_in_a_worker_process_equals_the_run_in_this_process(monkeypatch):
    """`make demo` runs each configuration in a spawned worker, for its own peak memory."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    # The spawned worker imports `bench.demo` by name with this process's sys.path, which pytest
    # keeps free of the repository root; the worker's needs it (`make demo` runs it as a script).
    monkeypatch.syspath_prepend(str(common.REPO))
    args = demo.parse_args(["--steps=3", "--batch-size=2", "--max-doc-tokens=64"])
    local = demo.Run("packed", "sentences", args)
    worker = demo.RunInSubprocess("packed", "sentences", args)
    worker.wait_ready()
    for index in range(args.steps):
        assert abs(worker.step(index) - local.step(index)) <= 1e-6
    summary = worker.summary()
    assert len(summary["losses"]) == args.steps
    assert summary["peak_memory_bytes"] >= summary["memory_at_start_bytes"] > 0
