"""bench/soak.py for a few seconds: mixed models, streamed and not, disconnects, cancelled asyncio
consumers and a reloaded adapter; every request ends with its own adapter's text or a clear error."""

import json

from bench import soak


def test_a_short_soak_holds(reference_path, tmp_path):
    out = tmp_path / "soak.json"
    code = soak.main(["--duration", "3", "--swap-every", "0.7", "--concurrency", "4", "--max-tokens", "8",
                      "--out", str(out)])  # fmt: skip
    report = json.loads(out.read_text())
    assert code == 0 and report["ok"], report
    counts = report["counts"]
    assert counts["swaps"] >= 2 and counts["finished_with_own_tokens"] > 0 and counts["consumers_cancelled"] > 0
