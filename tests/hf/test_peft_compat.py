"""The fused LoRA patch under the oldest peft that pyproject allows.

The Makefile installs that release with `pip install --no-deps --target .peft-compat/<version>`. Each
such folder gets one test, which runs this file as a script in a fresh Python with the folder first on
PYTHONPATH, so that the script imports that peft (and the installed transformers and torch). The
script patches a tiny LoRA Llama and a DoRA one and fails on the first check that does not hold.
"""

import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
COMPAT_DIR = REPO_ROOT / ".peft-compat"


def peft_sites():
    return sorted(path for path in COMPAT_DIR.glob("*") if (path / "peft").is_dir()) if COMPAT_DIR.is_dir() else []


@pytest.mark.parametrize("site", peft_sites(), ids=lambda site: f"peft-{site.name}")
def test_patch_under_old_peft(site):
    env = dict(os.environ)  # TRITON_INTERPRET as tests/conftest.py set it: the kernels run on CPU too
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(site), str(REPO_ROOT), env.get("PYTHONPATH")]))
    done = subprocess.run([sys.executable, __file__, site.name], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    assert done.stdout.strip().splitlines()[-1] == f"peft {site.name}: fused == peft, DoRA falls back"


def _logits_and_lora_grads(model, input_ids):
    model.zero_grad()
    logits = model(input_ids=input_ids).logits
    logits.square().mean().backward()
    return logits.detach(), {n: p.grad for n, p in model.named_parameters() if "lora_" in n}


def _check(expected_version):
    import peft
    import torch

    from fused_train.hf.peft_lora import patch_lora_layers
    from tests.hf.test_peft_lora import DEVICE, TARGETS, _assert_close
    from tests.hf.tiny_models import tiny_model

    assert peft.__version__ == expected_version, f"imported peft {peft.__version__} from {peft.__file__}"
    input_ids = torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(3)).to(DEVICE)

    def lora_model(**options):
        # init_lora_weights=False: B random too, so the LoRA branch and dA are not zero.
        config = peft.LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS, init_lora_weights=False, **options)
        return peft.get_peft_model(tiny_model("llama").to(DEVICE), config)

    reference = lora_model()
    patched = copy.deepcopy(reference)
    report = patch_lora_layers(patched)
    assert report.num_fused == 14 and report.num_fallback == 0, str(report)
    expected_logits, expected_grads = _logits_and_lora_grads(reference, input_ids)
    logits, grads = _logits_and_lora_grads(patched, input_ids)
    _assert_close(logits, expected_logits, "logits")
    assert grads.keys() == expected_grads.keys() and len(grads) == 28
    for name, grad in grads.items():
        _assert_close(grad, expected_grads[name], name)

    dora = lora_model(use_dora=True)
    with torch.no_grad():
        expected_logits = dora(input_ids=input_ids).logits
        report = patch_lora_layers(dora)
        # "DoRA" up to peft 0.15, peft's DoraLinearVariant from 0.16 on
        assert report.num_fused == 0, str(report)
        assert all(r.lower().startswith("lora variant dora") for r in report.fallback.values()), str(report)
        assert torch.equal(dora(input_ids=input_ids).logits, expected_logits)


if __name__ == "__main__":
    _check(sys.argv[1])
    print(f"peft {sys.argv[1]}: fused == peft, DoRA falls back")
