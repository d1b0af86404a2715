"""The optional GPU kernels: the only module that knows mamba_ssm and causal_conv1d.

Neither package is required. `get_kernels(tensor)` returns a `Kernels` for a CUDA tensor when the
packages import (each field is None where its kernel does not), and None for any other tensor or
with MLMAMBA_DISABLE_KERNELS=1; the mixers then run their torch code. The choice is made per call,
by the tensor's device, so CPU tensors never reach a CUDA kernel. When a kernel does not import, one
log line says why (the first time a CUDA tensor asks).

Each adapter takes the arguments of the torch function it stands in for, in the mixers' token-major
layout (b, l, channels); the layouts and flags the kernels want stay inside this module.

This module imports torch only (tests run the mixers without transformers).
"""

import logging
import os
from dataclasses import dataclass
from functools import lru_cache
from typing import Callable

import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

NO_DT_LIMIT = (0.0, float("inf"))


def import_mamba_ssm(module: str):
    """`mamba_ssm.<module>`, also from an install of mamba_ssm's Python and Triton part alone.

    mamba_ssm's package `__init__` imports its compiled Mamba-1 extension `selective_scan_cuda` (without a
    guard up to 2.3.2.post1), so on such an install every `import mamba_ssm.<anything>` fails, the Triton
    modules included. Then the package directory is entered as a bare package, without its `__init__`,
    and the module is imported from there. Raises ImportError when mamba_ssm is not installed.
    """
    import importlib
    import importlib.machinery
    import importlib.util
    import sys

    try:
        return importlib.import_module("mamba_ssm." + module)
    except ImportError:
        spec = importlib.util.find_spec("mamba_ssm")  # locates the package without running it
        if spec is None or not spec.submodule_search_locations or "mamba_ssm" in sys.modules:
            raise  # not installed, or the package imported and the module failed on its own
    package = importlib.util.module_from_spec(importlib.machinery.ModuleSpec("mamba_ssm", None, is_package=True))
    package.__path__ = list(spec.submodule_search_locations)
    sys.modules["mamba_ssm"] = package
    return importlib.import_module("mamba_ssm." + module)


@dataclass(frozen=True)
class Kernels:
    """Kernel adapters; a field is None where its kernel is not available."""

    # Mamba-2. ssd_chunk_scan: the signature and results of `mamba2_mixer.ssd_chunk_scan`.
    ssd_chunk_scan: Callable | None
    # ssd_step(state (b, h, p, n), x (b, h, p), dt_raw (b, h), dt_bias (h,), dt_limit, A (h,), B, C (b, g, n),
    #   D (h,)) -> y (b, h, p); state in place; dt = clamp(softplus(dt_raw + dt_bias), *dt_limit).
    ssd_step: Callable | None
    # Mamba-1. selective_scan(x, dt_raw (b, l, d), dt_bias (d,), A (d, n), B, C (b, l, n), D (d,),
    #   initial_state (b, d, n) | None, mask (b, l) | None) -> (y (b, l, d) with D, no gate; last state fp32),
    #   or None when it cannot take the call (the kernel starts from a zero state only).
    selective_scan: Callable | None
    # selective_step(state (b, d, n), x (b, d), dt_raw (b, d), dt_bias, A, B, C (b, n), D) -> y (b, d); in place
    selective_step: Callable | None
    # Both. causal_conv_silu / causal_conv_step: the signatures and results of `ssm_ops`' functions.
    causal_conv_silu: Callable | None
    causal_conv_step: Callable | None


def _try(what: str, load: Callable):
    try:
        return load()
    except Exception as err:  # a broken install fails in many ways; the torch path then runs
        logger.warning(
            "mlmamba: %s is unavailable on CUDA (%s: %s); using the torch path", what, type(err).__name__, err
        )
        return None


def _mamba2_adapters():
    mamba_chunk_scan_combined = import_mamba_ssm("ops.triton.ssd_combined").mamba_chunk_scan_combined
    selective_state_update = import_mamba_ssm("ops.triton.selective_state_update").selective_state_update

    def ssd_chunk_scan(x, dt, A, B, C, chunk_size, D=None, initial_state=None):
        y, final_state = mamba_chunk_scan_combined(
            x, dt, A, B, C, chunk_size, D=D, initial_states=initial_state, return_final_states=True
        )
        return y, final_state.float()

    def ssd_step(state, x, dt_raw, dt_bias, dt_limit, A, B, C, D):
        h, p = x.shape[1:]
        n = state.shape[-1]
        softplus = tuple(dt_limit) == NO_DT_LIMIT
        dt = dt_raw
        if not softplus:  # the kernel has no clamp: hand it the step sizes themselves, and a zero bias
            dt, dt_bias = F.softplus(dt_raw.float() + dt_bias.float()).clamp(*dt_limit), torch.zeros_like(dt_bias)
        return selective_state_update(
            state,
            x,
            dt[:, :, None].expand(-1, h, p),
            A[:, None, None].expand(h, p, n).to(torch.float32),
            B,
            C,
            D=D[:, None].expand(h, p),
            z=None,
            dt_bias=dt_bias[:, None].expand(h, p),
            dt_softplus=softplus,
        )

    return ssd_chunk_scan, ssd_step


def _selective_scan_adapter():
    import selective_scan_cuda  # noqa: F401  (recent mamba_ssm versions import it lazily, failing only when called)
    from mamba_ssm.ops.selective_scan_interface import selective_scan_fn

    def selective_scan(x, dt_raw, dt_bias, A, B, C, D, initial_state=None, mask=None):
        if initial_state is not None and bool(initial_state.any()):
            return None
        if mask is not None:
            # softplus(-1e4 + bias) is exactly 0 in fp32: pads take no step and leave the state as it is.
            dt_raw = dt_raw.masked_fill(~mask.bool()[:, :, None], -1e4)
        x, dt_raw, B, C = (t.transpose(1, 2) for t in (x, dt_raw, B, C))  # the kernel is channels first
        y, last_state = selective_scan_fn(
            x,
            dt_raw,
            A,
            B,
            C,
            D.float(),
            z=None,
            delta_bias=dt_bias.float(),
            delta_softplus=True,
            return_last_state=True,
        )
        return y.transpose(1, 2), last_state.float()

    return selective_scan


def _selective_step_adapter():
    selective_state_update = import_mamba_ssm("ops.triton.selective_state_update").selective_state_update

    def selective_step(state, x, dt_raw, dt_bias, A, B, C, D):
        return selective_state_update(state, x, dt_raw, A, B, C, D=D, z=None, dt_bias=dt_bias, dt_softplus=True)

    return selective_step


def _conv_adapters():
    from causal_conv1d import causal_conv1d_fn, causal_conv1d_update

    def causal_conv_silu(history, conv):
        l = history.shape[1] - conv.weight.shape[-1]
        x = history[:, 1:].transpose(1, 2).contiguous()  # channels first: (b, d, k - 1 + l)
        return causal_conv1d_fn(x, conv.weight[:, 0], conv.bias, activation="silu")[:, :, -l:].transpose(1, 2)

    def causal_conv_step(conv_state, x, conv):
        return causal_conv1d_update(x, conv_state, conv.weight[:, 0], conv.bias, "silu")

    return causal_conv_silu, causal_conv_step


@lru_cache(maxsize=None)
def load_kernels() -> Kernels | None:
    """Every kernel adapter that imports here (cached); None when none does."""
    mamba2 = _try("mamba_ssm's Triton SSD kernels (Mamba-2)", _mamba2_adapters) or (None, None)
    selective_scan = _try("mamba_ssm's CUDA selective scan (Mamba-1 prefill)", _selective_scan_adapter)
    selective_step = _try("mamba_ssm's Triton state update (Mamba-1 decoding)", _selective_step_adapter)
    conv = _try("causal_conv1d (the conv kernels)", _conv_adapters) or (None, None)
    kernels = Kernels(*mamba2, selective_scan, selective_step, *conv)
    return kernels if any(getattr(kernels, f) is not None for f in kernels.__dataclass_fields__) else None


def get_kernels(like: torch.Tensor) -> Kernels | None:
    """The kernels for a tensor on CUDA when importable and not disabled; None otherwise."""
    if not like.is_cuda or os.environ.get("MLMAMBA_DISABLE_KERNELS", "0") == "1":
        return None
    return load_kernels()
