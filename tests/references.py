"""Independent references the tests check the package against (they do not ship in model folders).

- `ssd_naive` and `selective_scan_naive`: the Mamba-2 and Mamba-1 recurrences one token at a time, with
  plain broadcasting (no chunks, no grouping tricks); differentiable.
- `causal_conv_silu_loop`: the depthwise causal conv written as a loop over positions, then SiLU.
- `rms_norm_gated_formula`: `rmsnorm(x * silu(z)) * weight` per group, written out.
- `ORDERS_3x4`: the cross scan's visiting orders on a 3 x 4 grid, written by hand; `grid_route_orders`:
  the same four orders for any grid, from index views (the mixer reference tests use it).
- `spread_weights`: redraws a module's weights at unit scale, so that comparisons prove something.

This module imports torch only.
"""

import torch
import torch.nn.functional as F
from torch import nn

# ---- the recurrences ------------------------------------------------------------------------------


def ssd_naive(x, dt, A, B, C, D=None, initial_state=None):
    """Reference recurrence, one token at a time, differentiable (tests only). Arguments as `ssd_chunk_scan`."""
    b, length, h, p = x.shape
    n = B.shape[-1]
    hg = h // B.shape[2]
    state = initial_state.float() if initial_state is not None else x.new_zeros(b, h, p, n, dtype=torch.float32)
    ys = []
    for t in range(length):
        dt_t = dt[:, t].float()  # (b, h)
        B_t = B[:, t].float().repeat_interleave(hg, dim=1)  # (b, h, n)
        C_t = C[:, t].float().repeat_interleave(hg, dim=1)
        state = (
            state * torch.exp(dt_t * A.float())[..., None, None]
            + (dt_t[..., None] * x[:, t].float())[..., None] * B_t[:, :, None]
        )
        y = (state * C_t[:, :, None]).sum(-1)
        if D is not None:
            y = y + x[:, t].float() * D.float()[:, None]
        ys.append(y.to(x.dtype))
    return torch.stack(ys, dim=1), state


def selective_scan_naive(x, dt, A, B, C, D=None, initial_state=None):
    """Reference recurrence, one token at a time, differentiable (tests only). Arguments as `selective_scan`."""
    b, _, d = x.shape
    n = A.shape[-1]
    A = A.float()
    state = initial_state.float() if initial_state is not None else x.new_zeros(b, d, n, dtype=torch.float32)
    ys = []
    for x_t, dt_t, B_t, C_t in zip(
        x.float().unbind(1), dt.float().unbind(1), B.float().unbind(1), C.float().unbind(1)
    ):
        state = state * torch.exp(dt_t[:, :, None] * A) + (dt_t * x_t)[:, :, None] * B_t[:, None, :]
        y = (state * C_t[:, None, :]).sum(-1)
        if D is not None:
            y = y + x_t * D.float()
        ys.append(y.to(x.dtype))
    return torch.stack(ys, dim=1), state


# ---- conv and norm ------------------------------------------------------------------------------------


def causal_conv_silu_loop(x: torch.Tensor, conv: nn.Conv1d) -> torch.Tensor:
    """SiLU of the depthwise causal conv of x (b, l, d) -> (b, l, d), zeros before the first input: a loop
    over positions, each output the sum of the last k inputs times the kernel."""
    length = x.shape[1]
    w = conv.weight[:, 0]  # (d, k)
    k = w.shape[1]
    padded = F.pad(x, (0, 0, k - 1, 0))
    bias = conv.bias if conv.bias is not None else 0.0
    out = torch.stack([(padded[:, t : t + k] * w.T).sum(1) + bias for t in range(length)], dim=1)
    return out * torch.sigmoid(out)


def rms_norm_gated_formula(x, z, weight, group_size: int, eps: float) -> torch.Tensor:
    """`rmsnorm(x * silu(z)) * weight` over groups of `group_size` channels (z None: no gate), in fp32."""
    y = x.float() if z is None else x.float() * z.float() * torch.sigmoid(z.float())
    y = y.reshape(*y.shape[:-1], -1, group_size)
    y = y / torch.sqrt(y.pow(2).mean(-1, keepdim=True) + eps)
    return y.reshape(x.shape) * weight.float()


# ---- scan routes -----------------------------------------------------------------------------------

# Hand-written visiting orders on a 3 x 4 grid whose tokens arrive row-major (position = 4 * row + col).
ORDERS_3x4 = {
    "forward": [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11],
    "backward": [11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0],
    "columns_forward": [0, 4, 8, 1, 5, 9, 2, 6, 10, 3, 7, 11],
    "columns_backward": [11, 7, 3, 10, 6, 2, 9, 5, 1, 8, 4, 0],
}


def grid_route_orders(h: int, w: int) -> list[tuple[str, torch.Tensor]]:
    """(parameter suffix, row-major positions in visiting order) of the cross scan's four routes on an h x w
    grid: rows forward, rows backward, columns forward, columns backward."""
    rows = torch.arange(h * w).view(h, w)
    return [
        ("", rows.flatten()),
        ("_b", rows.flatten().flip(0)),
        ("_c", rows.t().flatten()),
        ("_c_b", rows.t().flatten().flip(0)),
    ]


def to_row_major(y: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """y (b, l, ...) in a route's order -> row-major order: position order[k] gets y[:, k]."""
    back = torch.empty_like(y)
    back[:, order] = y
    return back


# ---- weights ---------------------------------------------------------------------------------------


@torch.no_grad()
def spread_weights(module: nn.Module, seed: int = 0) -> nn.Module:
    """Redraw every weight of `module` at unit scale: matrices N(0, 1 / fan_in), everything else N(0, 0.25),
    parameters named `*norm.weight` around 1. Initial weights are so small that the outputs barely depend on
    the mixers and images, and a comparison would prove little. Any value is valid for an SSM: A = -exp(A_log)
    < 0 and dt = softplus(...) > 0 whatever is drawn."""
    gen = torch.Generator().manual_seed(seed)
    for name, p in module.named_parameters():
        scale = 1 / p.shape[-1] ** 0.5 if p.ndim == 2 else 0.5
        p.copy_(torch.randn(p.shape, generator=gen) * scale + (1.0 if name.endswith("norm.weight") else 0.0))
    return module
