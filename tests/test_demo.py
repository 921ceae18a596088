"""The demo's three runs (padded, flattening, packed) must train identically, step by step.

They see the same documents from the same init; only the batch layout and the attention differ.
Equal losses at every step check the whole packed path end to end: collator labels and position
ids, document boundaries in the patched attention, and its gradients (a wrong gradient shows in
the next step's loss).
"""

import json

from bench import demo


def test_three_runs_train_identically_and_write_results(tmp_path, monkeypatch):
    # The demo exercises what a user's CPU runs (the PyTorch reference attention), not the Triton
    # interpreter that tests/conftest.py switches on; the kernels have tests of their own.
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    steps = 4
    exit_code = demo.main([f"--steps={steps}", "--batch-size=4", "--max-doc-tokens=160", f"--out={tmp_path}", "--in-process"])
    assert exit_code == 0

    report = json.loads((tmp_path / "demo.json").read_text())
    assert (tmp_path / "demo.png").stat().st_size > 0
    runs = report["runs"]
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
    assert report["comparison"]["padded_tokens_over_real_tokens"] > 1


def test_run_in_a_worker_process_equals_the_run_in_this_process(monkeypatch):
    """`make demo` runs each configuration in a spawned worker, for its own peak memory."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    args = demo.parse_args(["--steps=3", "--batch-size=2", "--max-doc-tokens=64"])
    local = demo.Run("packed", args)
    worker = demo.RunInSubprocess("packed", args)
    worker.wait_ready()
    for index in range(args.steps):
        assert abs(worker.step(index) - local.step(index)) <= 1e-6
    summary = worker.summary()
    assert len(summary["losses"]) == args.steps
    assert summary["peak_memory_bytes"] >= summary["memory_at_start_bytes"] > 0
