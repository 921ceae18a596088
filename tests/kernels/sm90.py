"""Compile Triton kernels for Hopper (sm_90) without a GPU and read what they use.

The tests set TRITON_INTERPRET=1 (tests/conftest.py), under which `@triton.jit` yields interpreter
functions that cannot be compiled for a GPU. So each compile test runs its own file as a script in
a fresh Python with that variable removed (`compile_in_subprocess`); the script compiles with
`compile_for_sm90` and prints its results as JSON on its last stdout line.
"""

import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

SHARED_LIMIT = 232448  # bytes of shared memory one block may use on sm_90
REPO_ROOT = Path(__file__).resolve().parents[2]
# Other Tritons the compile tests also run under: each a `pip install --target` folder here. The
# Makefile puts there the release the lent GPU machine runs (3.6), whose register allocation
# differs: configs that fit under the installed Triton have spilled under it.
COMPAT_DIR = REPO_ROOT / ".triton-compat"


def triton_sites():
    """None for the installed Triton, then each folder of COMPAT_DIR that holds a Triton."""
    extra = sorted(path for path in COMPAT_DIR.glob("*") if (path / "triton").is_dir()) if COMPAT_DIR.is_dir() else []
    return [None, *extra]


def triton_site_id(site):
    return "installed-triton" if site is None else f"triton-{site.name}"


def narrow_uses(ttir, args):
    """Those of the i32 arguments `args` that the TTIR uses other than by sign-extending them to i64.

    A stride that meets an offset only as i64 cannot overflow, whatever the index it multiplies;
    one used as i32 multiplies in 32 bits, which wraps for tensors of 2**31 elements or more."""
    signature = next(line for line in ttir.splitlines() if "tt.func" in line)
    assert all(f"%{arg}: i32" in signature for arg in args), (args, signature)
    uses = [line for line in ttir.splitlines() if "tt.func" not in line]
    return sorted({
        arg for arg in args
        for line in uses
        if re.search(rf"%{arg}\b", line) and not re.search(rf"arith\.extsi %{arg} : i32 to i64", line)
    })


def compile_for_sm90(fn, signature, constexprs, attrs, num_warps, num_stages, wide_args=()):
    """Compile `fn` for sm_90; return whether it uses wgmma and TMA loads, its shared memory in bytes, its
    per-thread REG, STACK and LOCAL (bytes spilled) as cuobjdump reports them, and `narrow`: those of
    the stride arguments `wide_args` that some offset uses in 32 bits (`narrow_uses`)."""
    kernel = triton.compile(
        ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs),
        target=GPUTarget("cuda", 90, 32),
        options={"num_warps": num_warps, "num_stages": num_stages},
    )
    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(prefix="fused_train_", suffix=".cubin") as cubin:
        cubin.write(kernel.asm["cubin"])
        cubin.flush()
        usage = subprocess.run([cuobjdump, "-res-usage", cubin.name], capture_output=True, text=True, check=True)
    return dict(
        wgmma="nvidia_mma<{versionMajor = 3" in kernel.asm["ttgir"],
        tma_loads="cp.async.bulk.tensor" in kernel.asm["ptx"],
        shared=kernel.metadata.shared,
        narrow=narrow_uses(kernel.asm["ttir"], wide_args),
        **{k: int(v) for k, v in re.findall(r"(REG|STACK|LOCAL):(\d+)", usage.stdout)},
    )


def compile_lora_variant(name, fn, signature, constexprs, config, aligned, needs_wgmma, wide_args):
    """`compile_for_sm90` of one variant of a LoRA kernel at `config` (its block sizes, warps and
    stages), every pointer and stride 16-divisible when `aligned` (counts and scales never are): its
    usage, with its `name`, `aligned` and whether it `needs_wgmma`."""
    constexprs = constexprs | {k: v for k, v in config.items() if k not in ("num_warps", "num_stages")}
    unaligned = {"rank", "M", "T", "lora_scale", "keep_scale", "scale"}
    attrs = {
        (i,): [["tt.divisibility", 16]]
        for i, (arg, kind) in enumerate(signature.items())
        if aligned and kind != "constexpr" and not kind.startswith("tensordesc") and arg not in unaligned
    }
    usage = compile_for_sm90(fn, signature, constexprs, attrs, config["num_warps"], config["num_stages"], wide_args)
    return dict(name=name, aligned=aligned, needs_wgmma=needs_wgmma, **usage)


def assert_lora_variant_fits(kernel):
    """What every compiled LoRA variant (`compile_lora_variant`) must show: shared memory within
    Hopper's limit, wgmma where needed, TMA loads exactly in the TMA kernel ("tma " names), 64-bit
    row offsets, and, aligned, no spills."""
    assert kernel["shared"] <= SHARED_LIMIT, kernel
    if kernel["needs_wgmma"]:
        assert kernel["wgmma"], kernel
    assert kernel["tma_loads"] == kernel["name"].startswith("tma "), kernel
    assert kernel["narrow"] == [], kernel
    # Tails are rare in real layers; there only correctness (and the limits above) is required.
    if kernel["aligned"]:
        assert kernel["REG"] <= 255 and kernel["STACK"] == 0 and kernel["LOCAL"] == 0, kernel


def compile_in_subprocess(script_path, timeout, triton_site=None):
    """Run the script without TRITON_INTERPRET and return the JSON list on its last stdout line.

    The repo root goes on PYTHONPATH so that the script can import this module as `tests.kernels.sm90`;
    `triton_site` (one of `triton_sites()`), ahead of it, makes the script import that Triton."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    sites = [str(triton_site)] if triton_site else []
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [*sites, str(REPO_ROOT), env.get("PYTHONPATH")]))
    done = subprocess.run([sys.executable, script_path], env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout.strip().splitlines()[-1])
