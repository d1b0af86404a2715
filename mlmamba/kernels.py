"""Optional GPU kernels (mamba_ssm's Triton SSD kernels, causal_conv1d's CUDA conv).

Neither package is required: `get_mamba2_kernels` returns None unless the tensor is on CUDA
and mamba_ssm's Triton functions import, and the mixers then use their pure-torch path.
Set `MLMAMBA_DISABLE_KERNELS=1` to force the torch path everywhere (for comparisons).

The wrappers take the same arguments as the torch functions in `mamba2_mixer.py`:
    chunk_scan(x, dt, A, B, C, chunk_size, D, initial_state) -> (y, final_state)
    state_update(state, x, dt_raw, A, B, C, D, dt_bias) -> y   (state updated in place;
        no dt_limit: mixers with a dt_limit use the torch step)
    conv_update(xBC, conv_state, weight, bias) -> silu(conv(xBC))        (conv_state updated in place)
"""

import os
from dataclasses import dataclass
from functools import lru_cache
from typing import Callable

import torch


@dataclass(frozen=True)
class Mamba2Kernels:
    chunk_scan: Callable
    state_update: Callable
    conv_update: Callable | None


@lru_cache(maxsize=None)
def _load_mamba2_kernels() -> Mamba2Kernels | None:
    try:
        # Import the Triton modules directly: `import mamba_ssm` also imports the Mamba-1 CUDA
        # extension, which a kernels-only install may lack.
        from mamba_ssm.ops.triton.selective_state_update import selective_state_update
        from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined
    except Exception:
        return None
    try:
        from causal_conv1d import causal_conv1d_update
    except Exception:
        causal_conv1d_update = None

    def chunk_scan(x, dt, A, B, C, chunk_size, D=None, initial_state=None):
        y, final_state = mamba_chunk_scan_combined(
            x, dt, A, B, C, chunk_size, D=D, initial_states=initial_state, return_final_states=True
        )
        return y, final_state.float()

    def state_update(state, x, dt_raw, A, B, C, D, dt_bias):
        h, p = x.shape[1:]
        n = state.shape[-1]
        return selective_state_update(
            state,
            x,
            dt_raw[:, :, None].expand(-1, h, p),
            A[:, None, None].expand(h, p, n).to(torch.float32),
            B,
            C,
            D=D[:, None].expand(h, p),
            z=None,
            dt_bias=dt_bias[:, None].expand(h, p),
            dt_softplus=True,
        )

    conv_update = None
    if causal_conv1d_update is not None:

        def conv_update(xBC, conv_state, weight, bias):
            return causal_conv1d_update(xBC, conv_state, weight, bias, "silu")

    return Mamba2Kernels(chunk_scan=chunk_scan, state_update=state_update, conv_update=conv_update)


def get_mamba2_kernels(like: torch.Tensor) -> Mamba2Kernels | None:
    """The kernels for a tensor on CUDA when importable and not disabled; None otherwise."""
    if not like.is_cuda or os.environ.get("MLMAMBA_DISABLE_KERNELS", "0") == "1":
        return None
    return _load_mamba2_kernels()
