"""Smoke run of bench/bench_collator.py: it exits 0 (the layouts' losses agree) and writes its JSON
and PNG with every provider on every corpus; run as a user would, without TRITON_INTERPRET."""

import json

from bench.bench_collator import CORPORA, PROVIDERS
from tests.bench.test_bench_kv import run_bench


def test_bench_collator_quick_writes_every_provider(tmp_path):
    run_bench("bench_collator.py", tmp_path)
    report = json.loads((tmp_path / "collator.json").read_text())
    assert (tmp_path / "collator.png").stat().st_size > 0
    assert list(report["corpora"]) == list(CORPORA)
    for entry in report["corpora"].values():
        providers = entry["providers"]
        assert list(providers) == list(PROVIDERS)
        assert providers["hf_flattening"]["over_hf_flattening"] == 1.0
        assert all(len(r["step_seconds"]) == report["settings"]["steps"] for r in providers.values())
        # One row without filler for both flat layouts; fixed rows of max_tokens; the default between.
        assert providers["packed_flatten"]["processed_over_real_tokens"] == 1.0
        widths = [shape[1] for shape in providers["packed_fixed"]["shapes"]]
        assert widths == [report["settings"]["max_tokens"]] * len(widths)
        filler = {name: providers[name]["processed_over_real_tokens"] for name in ("packed", "packed_fixed")}
        assert 1.0 <= filler["packed"] <= filler["packed_fixed"]
