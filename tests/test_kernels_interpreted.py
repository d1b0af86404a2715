"""The mixers' GPU kernel path, run on CPU: mamba_ssm's Triton kernels executed by Triton's interpreter
give the torch path's outputs and states (see tests/kernels_interpreted.py).

Runs when MLMAMBA_KERNELS_PYTHON names the python of a virtual environment with torch, triton and
mamba_ssm's Python + Triton part, as `nox -s kernels` does; skipped otherwise. It checks what a CPU can
check of the GPU path: the calls into `mamba_chunk_scan_combined` and `selective_state_update` (argument
layouts, dt bias and softplus, D, initial and final states, grouped heads), padding and decoding through
them, and loading them from an install without mamba_ssm's CUDA extensions. causal_conv1d (CUDA only) and
CUDA graphs need a GPU: tests/test_gpu.py.
"""

import json
import os
import subprocess
from pathlib import Path

import pytest

PYTHON = os.environ.get("MLMAMBA_KERNELS_PYTHON")
if PYTHON:
    PYTHON = os.path.abspath(PYTHON)

pytestmark = pytest.mark.skipif(not PYTHON, reason="needs Triton and mamba_ssm beside: `nox -s kernels` runs it")


def test_triton_kernels_equal_the_torch_path():
    script = Path(__file__).with_name("kernels_interpreted.py")
    run = subprocess.run([PYTHON, str(script)], capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    results = json.loads(run.stdout.strip().splitlines()[-1])
    assert results.pop("loaded") == {"ssd_chunk_scan": True, "ssd_step": True, "selective_step": True}
    results.pop("plain_import_works")  # False for mamba_ssm 2.3.2.post1 without its CUDA build
    expected = {
        "chunk_scan",
        "chunk_scan_groups_odd_length",
        "ssd_state_update",
        "ssd_state_update_dt_limit",
        "selective_state_update",
        "mamba2_mixer",
        "mamba1_mixer",
        "mamba2_mixer_bidirectional",
        "mamba2_mixer_cross",
    }
    assert set(results) == expected
    for check, tensors in results.items():
        for tensor, r in tensors.items():
            assert r["scale"] > 0.5, f"{check}.{tensor}: nothing to compare"
            assert r["diff"] <= 1e-5 * r["scale"], (
                f"{check}.{tensor}: kernels differ by {r['diff']:.3g} (scale {r['scale']:.3g})"
            )
