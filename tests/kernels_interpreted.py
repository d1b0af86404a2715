"""mamba_ssm's Triton kernels, run on CPU by Triton's interpreter, through the mixers' kernel path.

Run by tests/test_kernels_interpreted.py with the python of a virtual environment that holds torch,
triton and mamba_ssm's Python + Triton part (no CUDA build, no transformers): the README's setup makes
one, `.venv-kernels`. Prints one JSON object: for each check, the largest difference between the kernel
path and the torch path, and the scale of the compared values.

Three things make the GPU kernels run on CPU tensors here, none of them in the package:
- TRITON_INTERPRET=1: Triton executes each kernel's program instances in numpy.
- `torch.cuda.device(None)` is allowed (mamba_ssm enters it with a CPU tensor's device index).
- Autotuners keep their first config (there is no device to time the others on).
Kernels are forced on by replacing the mixers' `get_kernels`, which otherwise returns None for tensors
that are not on CUDA.
"""

import importlib.machinery
import importlib.util
import json
import os
import sys
from pathlib import Path

os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402
import triton  # noqa: E402

_cuda_device = torch.cuda.device


class _Device(_cuda_device):
    def __init__(self, device):
        self.cpu = device is None
        if not self.cpu:
            super().__init__(device)

    def __enter__(self):
        return None if self.cpu else super().__enter__()

    def __exit__(self, *exc):
        return False if self.cpu else super().__exit__(*exc)


torch.cuda.device = _Device
# One thread: with more, a process that had imported Triton now and then computed the torch reference
# slightly differently (docs/TESTING.md tells the investigation).
torch.set_num_threads(1)
_autotune = triton.autotune
triton.autotune = lambda configs, *args, **kwargs: _autotune(configs[:1], *args, **kwargs)

# the mixer modules import only torch: load them from the source tree without the package __init__
# (which imports transformers, not installed here)
package = importlib.util.module_from_spec(importlib.machinery.ModuleSpec("mlmamba", None, is_package=True))
package.__path__ = [str(Path(__file__).resolve().parents[1] / "mlmamba")]
sys.modules["mlmamba"] = package
from mlmamba import kernels  # noqa: E402
from mlmamba import mamba1_mixer as m1  # noqa: E402
from mlmamba import mamba2_mixer as m2  # noqa: E402


def diff(a, b):
    return {"diff": (a - b).abs().max().item(), "scale": b.abs().max().item()}


def main():
    results = {}
    try:
        import mamba_ssm  # noqa: F401

        results["plain_import_works"] = True
    except ImportError:
        results["plain_import_works"] = False  # 2.3.2.post1 without its CUDA build: `import_mamba_ssm` is needed
    k = kernels.load_kernels()
    results["loaded"] = {
        "ssd_chunk_scan": k is not None and k.ssd_chunk_scan is not None,
        "ssd_step": k is not None and k.ssd_step is not None,
        "selective_step": k is not None and k.selective_step is not None,
    }
    gen = torch.Generator().manual_seed(0)

    def randn(*shape, scale=1.0):
        return torch.randn(*shape, generator=gen) * scale

    torch.set_grad_enabled(False)
    # 1. The wrappers against the torch functions they stand in for.
    for name, (b, l, h, p, g, n, chunk, with_state) in {
        "chunk_scan": (2, 40, 4, 8, 1, 16, 16, True),
        "chunk_scan_groups_odd_length": (2, 37, 4, 8, 2, 16, 8, False),
    }.items():
        x, B, C = randn(b, l, h, p), randn(b, l, g, n), randn(b, l, g, n)
        dt, A, D = torch.rand(b, l, h, generator=gen) * 0.5, -torch.rand(h, generator=gen) * 2 - 0.1, randn(h)
        s0 = randn(b, h, p, n) if with_state else None
        y_ref, state_ref = m2.ssd_chunk_scan(x, dt, A, B, C, chunk, D=D, initial_state=s0)
        y, state = k.ssd_chunk_scan(x, dt, A, B, C, chunk, D=D, initial_state=s0)
        results[name] = {"y": diff(y, y_ref), "state": diff(state, state_ref)}
    b, h, p, g, n = 2, 4, 8, 2, 16
    state, x, dt_raw, dt_bias = randn(b, h, p, n), randn(b, h, p), randn(b, h), randn(h)
    A, D, B, C = -torch.rand(h, generator=gen) - 0.1, randn(h), randn(b, g, n), randn(b, g, n)
    s_ref, s_k = state.clone(), state.clone()
    y_ref = m2.ssd_step(s_ref, x, torch.nn.functional.softplus(dt_raw + dt_bias), A, B, C, D)
    y = k.ssd_step(s_k, x, dt_raw, dt_bias, kernels.NO_DT_LIMIT, A, B, C, D)
    results["ssd_state_update"] = {"y": diff(y, y_ref), "state": diff(s_k, s_ref)}
    limit = (0.05, 0.5)  # the clamp the kernel lacks: the adapter hands it the clamped step sizes
    s_ref, s_k = state.clone(), state.clone()
    y_ref = m2.ssd_step(s_ref, x, torch.nn.functional.softplus(dt_raw + dt_bias).clamp(*limit), A, B, C, D)
    y = k.ssd_step(s_k, x, dt_raw, dt_bias, limit, A, B, C, D)
    results["ssd_state_update_dt_limit"] = {"y": diff(y, y_ref), "state": diff(s_k, s_ref)}

    d, n = 12, 4
    state, x, dt_raw, dt_bias = randn(b, d, n), randn(b, d), randn(b, d), randn(d)
    A, D, B, C = -torch.rand(d, n, generator=gen) - 0.1, randn(d), randn(b, n), randn(b, n)
    s_ref, s_k = state.clone(), state.clone()
    y_ref = m1.selective_step(s_ref, x, torch.nn.functional.softplus(dt_raw + dt_bias), A, B, C, D)
    y = k.selective_step(s_k, x, dt_raw, dt_bias, A, B, C, D)
    results["selective_state_update"] = {"y": diff(y, y_ref), "state": diff(s_k, s_ref)}

    # 2. Whole mixers, kernels forced on or off: a left-padded prefill into the states, a continuation,
    #    then decoding steps (causal); the route scans of the connectors.
    use = {"on": False}
    m2.get_kernels = m1.get_kernels = lambda like: k if use["on"] else None
    mask = torch.ones(3, 15, dtype=torch.long)
    mask[1, :5] = 0
    mask[2, :12] = 0
    for name, mixer, states in (
        ("mamba2_mixer", m2.Mamba2Mixer(32, d_state=16, headdim=8, ngroups=2, chunk_size=8), "mamba2"),
        ("mamba1_mixer", m1.Mamba1Mixer(32, d_state=8), "mamba1"),
    ):
        spread(mixer, gen)
        u = randn(3, 24, 32)
        runs = []
        for on in (False, True):
            use["on"] = on
            if states == "mamba2":
                conv, ssm = (
                    torch.zeros(3, mixer.conv_dim, 4),
                    torch.zeros(3, mixer.nheads, mixer.headdim, mixer.d_state),
                )
            else:
                conv, ssm = torch.zeros(3, mixer.d_inner, 4), torch.zeros(3, mixer.d_inner, mixer.d_state)
            out = [
                mixer(u[:, :15], mask, conv_state=conv, ssm_state=ssm),
                mixer(u[:, 15:19], conv_state=conv, ssm_state=ssm),
            ]
            out += [mixer(u[:, t : t + 1], conv_state=conv, ssm_state=ssm) for t in range(19, 24)]
            runs.append((torch.cat(out, 1), conv, ssm))
        (o_t, c_t, s_t), (o_k, c_k, s_k) = runs
        tokens = torch.cat([mask, torch.ones(3, 9, dtype=torch.long)], 1).bool()
        results[name] = {
            "out": diff(o_k[tokens], o_t[tokens]),
            "conv_state": diff(c_k, c_t),
            "ssm_state": diff(s_k, s_t),
        }
    for scan in ("bidirectional", "cross"):
        mixer = spread(m2.Mamba2Mixer(32, d_state=16, headdim=8, chunk_size=8, scan=scan), gen)
        u = randn(2, 12, 32)
        outs = []
        for on in (False, True):
            use["on"] = on
            outs.append(mixer(u, grid=(3, 4)))
        results[f"mamba2_mixer_{scan}"] = {"out": diff(outs[1], outs[0])}
    print(json.dumps(results))


def spread(module, gen):
    """Weights at unit scale (norm weights around 1), so that every part of the mixer matters."""
    for name, p in module.named_parameters():
        scale = 1 / p.shape[-1] ** 0.5 if p.ndim >= 2 else 0.3
        p.copy_(torch.randn(p.shape, generator=gen) * scale + (1.0 if name.endswith("norm.weight") else 0.0))
    return module.eval()


if __name__ == "__main__":
    main()
