"""Gathers a GPU check folder into gpu_check.json and prints a short table (the last thing the run shows)."""

import json
import sys
import xml.etree.ElementTree as ElementTree
from pathlib import Path


def main(folder: str) -> None:
    out = Path(folder)
    steps = {}
    steps_file = out / "steps.txt"
    if steps_file.exists():
        for line in steps_file.read_text().splitlines():
            name, rc, seconds = line.split()
            steps[name] = {"rc": int(rc.split("=")[1]), "seconds": int(seconds.split("=")[1])}
    tests = None
    if (out / "tests.xml").exists():
        suite = ElementTree.parse(out / "tests.xml").getroot()
        suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
        tests = {key: int(suite.get(key, 0)) for key in ("tests", "failures", "errors", "skipped")}
    benches = {}
    for path in sorted(out.glob("*.json")):
        if path.name != "gpu_check.json":
            benches[path.stem] = json.loads(path.read_text())
    (out / "gpu_check.json").write_text(json.dumps({"steps": steps, "tests": tests, "benches": benches}, indent=1))

    print("\n== GPU check summary ==")
    for name, step in steps.items():
        print(f"{name:28s} rc={step['rc']:<4d} {step['seconds']:4d} s")
    print(f"tests: {tests}")
    for name, result in benches.items():
        for row in result.get("summary", []) if isinstance(result, dict) else []:
            print(f"{name}: " + "  ".join(f"{k}={v}" for k, v in row.items()))


if __name__ == "__main__":
    main(sys.argv[1])
