"""Nothing in this checkout shadows a dependency, however Python is started from its root.

transformers >= 5.25 imports PyPI's `kernels` whenever a model module loads; our Triton kernels live
in the top-level folder `kernels/`. That folder has no `__init__.py` (the package reaches it through
the link `fused_train/kernels`), so where the root is on sys.path it is at most a namespace portion,
and a regular package of the same name always wins.
"""

import importlib.metadata
import importlib.util
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

# Every entry point below is asked for `--help`: argparse's help is formatted once the entry point has
# set sys.path its own way and imported what it imports at the top, and that is when the probe runs.
PROBE = textwrap.dedent(
    """
    import argparse

    _format_help = argparse.ArgumentParser.format_help

    def _probe_then_format_help(parser):
        import transformers.integrations.hub_kernels  # noqa: F401
        from transformers import LlamaConfig, LlamaForCausalLM

        import kernels

        config = LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                             num_key_value_heads=1, vocab_size=32)
        LlamaForCausalLM(config)
        print("PROBE-KERNELS", getattr(kernels, "__file__", None), flush=True)
        return _format_help(parser)

    argparse.ArgumentParser.format_help = _probe_then_format_help
    """
)

ENTRY_POINTS = {
    "python -c": [sys.executable, "-c", "import argparse; argparse.ArgumentParser().parse_args()", "--help"],
    "python -m pytest": [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "--help"],
    "pytest": [str(BIN / "pytest"), "-p", "no:cacheprovider", "--help"],
    "python -m fused_train.cli serve": [sys.executable, "-m", "fused_train.cli", "serve", "--help"],
    "fused-train serve": [str(BIN / "fused-train"), "serve", "--help"],
    "make demo (bench/demo.py)": [sys.executable, "bench/demo.py", "--help"],
    "make serve-demo (bench/serve_demo.py)": [sys.executable, "bench/serve_demo.py", "--help"],
    **{
        f"bench/{path.name}": [sys.executable, f"bench/{path.name}", "--help"]
        for path in sorted((REPO / "bench").glob("*.py"))
        if path.name not in {"demo.py", "serve_demo.py"} and "argparse" in path.read_text()
    },
}


@pytest.fixture(scope="module")
def probe_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("probe")
    (folder / "sitecustomize.py").write_text(PROBE)
    return folder


@pytest.mark.parametrize("name", list(ENTRY_POINTS))
def test_entry_point_from_the_root_imports_the_real_kernels(name, probe_dir):
    pytest.importorskip("kernels", reason="PyPI's kernels (a dependency of transformers >= 5.25) is not installed")
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "PYTHONPATH")}
    env["PYTHONPATH"] = str(probe_dir)
    done = subprocess.run(ENTRY_POINTS[name], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    output = done.stdout + done.stderr
    assert "PROBE-KERNELS" in done.stdout, output[-4000:]
    kernels_file = done.stdout.split("PROBE-KERNELS", 1)[1].split()[0]
    assert kernels_file == importlib.util.find_spec("kernels").origin, f"{name} imported {kernels_file}"


def test_no_name_at_the_root_or_in_bench_is_a_dependencys():
    """The names Python can import from the root (`python -c`, `python -m` there) or from bench/ (a script's
    own folder) are none that an installed distribution provides, but `kernels`, a namespace portion only."""
    provided = set(importlib.metadata.packages_distributions()) - {"fused_train"}
    clashes = []
    for folder in (REPO, REPO / "bench"):
        for entry in folder.iterdir():
            name = entry.stem if entry.suffix == ".py" else entry.name
            if not name.isidentifier() or name not in provided:
                continue
            if entry.is_dir() and not (entry / "__init__.py").exists() and name == "kernels":
                continue
            clashes.append(str(entry.relative_to(REPO)))
    assert not clashes, f"these shadow installed packages of the same name: {clashes}"
    assert not (REPO / "kernels" / "__init__.py").exists(), "kernels/__init__.py would shadow PyPI's kernels"
