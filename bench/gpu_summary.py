"""Gathers a GPU check folder into gpu_check.json and prints a short table (the last thing the run shows).

What it reads, each written by bench/gpu_check.sh as its step ended: step_<name>.json (rc, start,
seconds, limit), tests_<file>.xml (pytest's junit xml per test file), and the benches' JSON files.
"""

import json
import sys
import xml.etree.ElementTree as ElementTree
from pathlib import Path

COUNTS = ("tests", "failures", "errors", "skipped")


def junit_counts(path: Path) -> dict:
    suite = ElementTree.parse(path).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    return {key: int(suite.get(key, 0)) for key in COUNTS}


def main(folder: str) -> None:
    out = Path(folder)
    steps = [json.loads(path.read_text()) for path in out.glob("step_*.json")]
    steps.sort(key=lambda step: step["started"])
    tests = {path.stem: junit_counts(path) for path in sorted(out.glob("tests_*.xml"))}
    total = {key: sum(counts[key] for counts in tests.values()) for key in COUNTS}
    benches = {}
    for path in sorted(out.glob("*.json")):
        if path.name != "gpu_check.json" and not path.name.startswith("step_"):
            benches[path.stem] = json.loads(path.read_text())
    summary = {"steps": steps, "tests": total, "test_files": tests, "benches": benches}
    (out / "gpu_check.json").write_text(json.dumps(summary, indent=1))

    print("\n== GPU check summary ==")
    for step in steps:
        print(f"{step['name']:28s} rc={step['rc']:<4d} {step['seconds']:4d} s of {step['limit']}")
    print(f"tests: {total}")
    for name, counts in tests.items():
        if counts["failures"] or counts["errors"]:
            print(f"  {name}: {counts}")
    for name, result in benches.items():
        for row in result.get("summary", []) if isinstance(result, dict) else []:
            print(f"{name}: " + "  ".join(f"{k}={v}" for k, v in row.items()))


if __name__ == "__main__":
    main(sys.argv[1])
