"""The Mamba-2 (SSD) mixer, one implementation for the language model and the scan connector.

Parameter names follow state-spaces/mamba `mamba_ssm/modules/mamba2.py` so that released
checkpoints load by renaming prefixes only:

    in_proj   Linear(d_model -> [z: d_inner | xBC: d_inner + 2*ngroups*d_state | dt: nheads])
    conv1d    depthwise causal Conv1d over xBC (kernel d_conv), followed by SiLU
    dt_bias, A_log, D   one scalar per head
    norm      gated RMSNorm: rmsnorm(y * silu(z)) per group (norm_before_gate=False)
    out_proj  Linear(d_inner -> d_model)

Non-causal scans (`scan=`) run several "routes" over the same tokens (see `SCAN_ROUTES`):
  * "bidirectional" (ML-Mamba's MSC, released as "Bidirectional_Mamba"; BSM in VL-Mamba) adds
    `conv1d_b`, `dt_bias_b`, `A_log_b`, `D_b` for a second scan over the reversed sequence and
    returns `out_proj((norm(y_fwd, z) + flip(norm(y_bwd, flip(z)))) / 2)`: in_proj, norm and
    out_proj are shared; each direction is gated and normalised before the average (as in the
    released fork's `Mamba2` with `bimamba_type="v2"`).
  * "cross" (CSM in VL-Mamba, VMamba's SS2D routes) scans an h x w patch grid whose tokens arrive
    row-major along four routes: rows forward, rows backward, columns forward, columns backward,
    with parameters suffixed "", "_b", "_c", "_c_b". Same rule: each route's output is put back in
    row-major order, gated and normalised, and the routes are averaged before out_proj.

Shapes used throughout: b = batch, l = sequence, h = nheads, p = headdim, g = ngroups,
n = d_state, c = number of chunks, s/t = positions inside a chunk.

Two scan algorithms, equal up to float rounding:
  * `ssd_chunk_scan`: the chunked SSD algorithm for whole sequences (prefill, training).
    Per chunk it builds (chunk x chunk) mixing matrices, never (sequence x sequence), and it
    never repeats B or C over heads, so memory is O(l * h * chunk) + O(l / chunk * h * p * n).
  * `ssd_step`: the recurrence for one new token (decoding), O(h * p * n).
On CUDA, mamba_ssm's Triton kernels are used where importable (see `get_mamba2_kernels`).
"""

import math
import os
from dataclasses import dataclass
from functools import lru_cache
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn



def _rms_scale(x: torch.Tensor, eps: float) -> torch.Tensor:
    """1 / rms(x) over the last dimension, (..., 1), from one reduction pass (no x**2 temporary)."""
    return torch.rsqrt(torch.linalg.vector_norm(x, dim=-1, keepdim=True).square() / x.shape[-1] + eps)


# The norms below, like the scan, work in place on their own temporaries when autograd is off
# (inference): every large temporary a CPU allocates is fresh memory the kernel has to map, and on the
# 2-core machine here that cost more than the arithmetic of these elementwise passes.


class RMSNormGated(nn.Module):
    """`rmsnorm(x * silu(z)) * weight`, normalised per group of `group_size` channels, in fp32."""

    def __init__(self, hidden_size: int, group_size: int, eps: float = 1e-5):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.group_size = group_size
        self.eps = eps

    def forward(self, x: torch.Tensor, z: torch.Tensor | None = None) -> torch.Tensor:
        dtype = x.dtype
        inplace = z is not None and not torch.is_grad_enabled()  # then x is a temporary of our own
        if z is not None:
            x = F.silu(z.float()).mul_(x) if inplace else x.float() * F.silu(z.float())
        else:
            x = x.float()
        x = x.unflatten(-1, (-1, self.group_size))
        x = x.mul_(_rms_scale(x, self.eps)) if inplace else x * _rms_scale(x, self.eps)
        x = x.flatten(-2)
        return (x.mul_(self.weight.float()) if inplace else x * self.weight.float()).to(dtype)


class RMSNorm(nn.Module):
    """Plain RMSNorm computed in fp32 (mamba_ssm's `RMSNorm`), output in the weight dtype."""

    def __init__(self, hidden_size: int, eps: float = 1e-5):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * _rms_scale(x32, self.eps)  # a new tensor: x (the residual stream) is left as it is
        x32 = x32.mul_(self.weight.float()) if not torch.is_grad_enabled() else x32 * self.weight.float()
        return x32.to(self.weight.dtype)


# --------------------------------------------------------------------------------------
# Scans (pure torch). All math in fp32.
# --------------------------------------------------------------------------------------

# The torch scan's chunk length when the config's is longer. The result does not depend on it (up to
# rounding); the (chunk x chunk) work does: on a 2-core CPU, prefill of mamba2-130m-sized layers took
# 1438 / 1171 / 1165 / 1397 ms at 829 tokens and 3615 / 3342 / 3137 / 3236 ms at 2048 tokens with chunks
# of 256 (the kernels' and the config's) / 128 / 64 / 32.
TORCH_CHUNK_SIZE = 64

# exp() arguments of the scans' decays are raised to this floor (both mixers): exp(-60) ~ 1e-26 is nothing
# next to fp32 rounding, and it keeps exp() and the products after it off denormal numbers, which made
# them 6-37 times slower on CPUs.
EXP_FLOOR = -60.0


def _product(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a * b (broadcast) as a new contiguous tensor, whatever the strides of a and b, written in one
    pass when autograd is off."""
    if torch.is_grad_enabled():
        return (a * b).contiguous()
    return torch.mul(a, b, out=a.new_empty(torch.broadcast_shapes(a.shape, b.shape)))


def ssd_chunk_scan(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    chunk_size: int,
    D: torch.Tensor | None = None,
    initial_state: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Chunked SSD scan: h_t = exp(dt_t A) h_{t-1} + dt_t B_t x_t,  y_t = C_t h_t + D x_t.

    Args:
        x: (b, l, h, p) inputs.
        dt: (b, l, h) step sizes, already `softplus(dt + dt_bias)`; a zero step leaves the state untouched.
        A: (h,) negative decay rates.
        B, C: (b, l, g, n) input and output projections, shared by the h // g heads of a group.
        chunk_size: chunk length; the result does not depend on it (up to rounding).
        D: (h,) skip connection.
        initial_state: (b, h, p, n) state before the first token, or None for zeros.

    Returns:
        y: (b, l, h, p) in x's dtype and final_state: (b, h, p, n) in fp32.

    Heads are split as (g, j) with j = h // g. Tensors keep the token-major layout of x,
    (b, c, s, h, p) with c chunks of s positions, except the (t, s) mixing inside a chunk, which is
    computed per head. The states are kept transposed, (n, j * p) per group, so that the products with
    B and C are one matmul per chunk and group over all j * p channels of its heads. Without autograd
    (inference) the large tensors are updated in place.
    """
    b, l, h, p = x.shape
    g, n = B.shape[-2:]
    j = h // g
    dtype = x.dtype
    inplace = not torch.is_grad_enabled()
    pad = (-l) % chunk_size
    c, q = (l + pad) // chunk_size, chunk_size
    if pad:
        # Zero steps and zero inputs leave the state as it is, so padding does not change it.
        x, B, C = (F.pad(t, (0, 0, 0, 0, 0, pad)) for t in (x, B, C))
        dt = F.pad(dt, (0, 0, 0, pad))
    x = x.float().view(b, c, q, h, p)
    dt = dt.float().view(b, c, q, h)
    B = B.float().view(b, c, q, g, n).transpose(2, 3)  # (b, c, g, s, n)
    C = C.float().view(b, c, q, g, n).transpose(2, 3)  # (b, c, g, t, n)
    # exp() of every decay is taken of exponents raised to at least EXP_FLOOR.
    dA_cumsum = torch.cumsum(dt * A.float(), dim=2)  # (b, c, s, h), within each chunk
    dA_heads = dA_cumsum.transpose(2, 3).contiguous()  # (b, c, h, s)
    dt_heads = dt.transpose(2, 3)  # (b, c, h, s)

    # 1. Within each chunk: y[t] = sum_{s<=t} (C_t . B_s) exp(dA_cumsum[t] - dA_cumsum[s]) dt_s x_s
    #    (differences of the cumulative sum, as mamba_ssm's kernels compute them). For s > t the
    #    difference is >= 0: it is clamped to 0 and the causal mask on the small C.B matrix zeroes it.
    causal = torch.ones(q, q, dtype=torch.bool, device=x.device).tril()
    CB = (C @ B.transpose(-1, -2)).masked_fill_(~causal, 0.0)[:, :, :, None]  # (b, c, g, 1, t, s)
    L = dA_heads.view(b, c, g, j, q, 1) - dA_heads.view(b, c, g, j, 1, q)  # (b, c, g, j, t, s)
    L = L.clamp_(EXP_FLOOR, 0.0).exp_().mul_(CB) if inplace else torch.exp(L.clamp(EXP_FLOOR, 0.0)) * CB
    xdt = _product(x.transpose(2, 3), dt_heads[..., None])  # head-major: (b, c, h, s, p)
    y_diag = L @ xdt.view(b, c, g, j, q, p)  # (b, c, g, j, t, p)
    del L

    # 2. The state each chunk adds by its end: sum_s exp(dA_cumsum[end] - dA_cumsum[s]) dt_s x_s B_s^T.
    #    States are kept transposed, (n, j * p) per group: B^T (n, s) @ (s, j * p) reads x token-major.
    decay_to_end = torch.exp((dA_cumsum[:, :, -1:] - dA_cumsum).clamp(min=EXP_FLOOR))  # (b, c, s, h)
    xw = x * (dt * decay_to_end)[..., None]  # (b, c, s, h, p)
    if g > 1:
        xw = xw.view(b, c, q, g, j * p).transpose(2, 3)
    chunk_states = B.transpose(-1, -2) @ xw.view(b, c, g, q, j * p)  # (b, c, g, n, j * p)

    # 3. Carry the state across chunks (c = l / chunk_size steps).
    if initial_state is None:
        state = x.new_zeros(b, g, n, j * p)
    else:
        state = initial_state.float().view(b, g, j, p, n).permute(0, 1, 4, 2, 3).reshape(b, g, n, j * p)
    chunk_decay = torch.exp(dA_cumsum[:, :, -1].clamp(min=EXP_FLOOR)).view(b, c, g, 1, j, 1)
    chunk_states = chunk_states.view(b, c, g, n, j, p)
    state = state.view(b, g, n, j, p)
    if inplace:  # the state entering chunk i takes the place of what chunk i adds, once that is read
        for i in range(c):
            entering = state
            state = torch.addcmul(chunk_states[:, i], entering, chunk_decay[:, i])
            chunk_states[:, i] = entering
        states_before = chunk_states
    else:
        states_before = []
        for i in range(c):
            states_before.append(state)
            state = torch.addcmul(chunk_states[:, i], state, chunk_decay[:, i])
        states_before = torch.stack(states_before, dim=1)

    # 4. What the state entering each chunk contributes: y[t] += exp(dA_cumsum[t]) C_t . state,
    #    as (t, n) @ (n, j * p) per chunk and group, token-major.
    y = C @ states_before.view(b, c, g, n, j * p)  # (b, c, g, t, j * p)
    y = y.view(b, c, g, q, j, p).transpose(2, 3).reshape(b, c, q, h, p)  # a view when g == 1
    decay_from_start = torch.exp(dA_cumsum.clamp(min=EXP_FLOOR))[..., None]  # (b, c, t, h, 1)
    y_diag = y_diag.view(b, c, h, q, p).transpose(2, 3)  # (b, c, t, h, p), strided
    y = y.mul_(decay_from_start).add_(y_diag) if inplace else y * decay_from_start + y_diag
    if D is not None:
        D = D.float().view(h, 1)
        y = y.addcmul_(x, D) if inplace else torch.addcmul(y, x, D)
    final_state = state.permute(0, 1, 3, 4, 2).reshape(b, h, p, n)  # (b, g, n, j, p) -> (b, h, p, n)
    return y.view(b, c * q, h, p)[:, :l].to(dtype), final_state


def ssd_step(
    state: torch.Tensor,
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
) -> torch.Tensor:
    """One recurrent step, updating `state` in place.

    Args:
        state: (b, h, p, n) SSM state (any float dtype; updated in place).
        x: (b, h, p); dt: (b, h) (already softplus'd); A, D: (h,); B, C: (b, g, n).

    Returns:
        y: (b, h, p) in x's dtype.
    """
    b, h, p = x.shape
    g, n = B.shape[-2:]
    j = h // g
    x32 = x.float()
    dA = torch.exp(dt.float() * A.float())  # (b, h)
    dtx = (dt.float()[:, :, None] * x32).view(b * g, j * p, 1)
    B = B.float().reshape(b * g, 1, n)
    C = C.float().reshape(b * g, n, 1)
    # The heads of a group share B and C: one (j * p, n) matrix per group takes the outer product with B
    # and the product with C.
    if state.dtype == torch.float32 and not torch.is_grad_enabled():
        # Decoding: update the state where it lies, two passes over it and no (b, h, p, n) temporaries
        # (the state is the largest tensor a step touches besides the weights).
        new_state = state.mul_(dA[:, :, None, None]).view(b * g, j * p, n).baddbmm_(dtx, B)
    else:
        new_state = torch.baddbmm((state.float() * dA[:, :, None, None]).view(b * g, j * p, n), dtx, B)
        state.copy_(new_state.view(b, h, p, n))
    y = torch.bmm(new_state, C).view(b, h, p)
    if D is not None:
        y = torch.addcmul(y, x32, D.float()[:, None])
    return y.to(x.dtype)


def ssd_naive(x, dt, A, B, C, D=None, initial_state=None):
    """Reference recurrence, one token at a time, differentiable (tests only). Arguments as `ssd_chunk_scan`."""
    b, l, h, p = x.shape
    n = B.shape[-1]
    hg = h // B.shape[2]
    state = initial_state.float() if initial_state is not None else x.new_zeros(b, h, p, n, dtype=torch.float32)
    ys = []
    for t in range(l):
        dt_t = dt[:, t].float()  # (b, h)
        B_t = B[:, t].float().repeat_interleave(hg, dim=1)  # (b, h, n)
        C_t = C[:, t].float().repeat_interleave(hg, dim=1)
        state = state * torch.exp(dt_t * A.float())[..., None, None] + (dt_t[..., None] * x[:, t].float())[..., None] * B_t[:, :, None]
        y = (state * C_t[:, :, None]).sum(-1)
        if D is not None:
            y = y + x[:, t].float() * D.float()[:, None]
        ys.append(y.to(x.dtype))
    return torch.stack(ys, dim=1), state


# --------------------------------------------------------------------------------------
# Causal depthwise conv of both mixers, token-major: (b, l, d) in and out, as in_proj lays them out.
# The "history" of a call is [the d_conv inputs before it; its inputs]: (b, d_conv + l, d). The conv
# reads it, and the next conv state is a slice of it.
# --------------------------------------------------------------------------------------


def conv_history(x: torch.Tensor, conv_state: torch.Tensor | None, d_conv: int) -> torch.Tensor:
    """x: (b, l, d); conv_state: (b, d, d_conv), the last d_conv inputs before x, or None (zeros).
    Returns (b, d_conv + l, d), token-major."""
    if conv_state is None:
        return F.pad(x, (0, 0, d_conv, 0))
    return torch.cat([conv_state.transpose(1, 2).to(x.dtype), x], dim=1)


def causal_conv_silu(history: torch.Tensor, conv: nn.Conv1d) -> torch.Tensor:
    """SiLU of the depthwise causal conv of the inputs in `history` (b, d_conv + l, d) -> (b, l, d).

    Runs as a conv2d over a (b, d, 1, time) channels-last view of the token-major tensor, so no
    transposed copy is made on the way in or out (the output is channels-last too): on a CPU that was
    five times faster than conv1d over a (b, d, time) copy, and it hands the scan token-major rows.
    """
    x = history[:, 1:].transpose(1, 2).unsqueeze(2)  # (b, d, 1, d_conv - 1 + l), channels-last strides
    out = F.conv2d(x, conv.weight.unsqueeze(2), conv.bias, groups=x.shape[1])  # (b, d, 1, l)
    return F.silu(out.squeeze(2).transpose(1, 2), inplace=not torch.is_grad_enabled())


def update_conv_state(conv_state: torch.Tensor, history: torch.Tensor, lengths: torch.Tensor | None = None) -> None:
    """conv_state (b, d, d_conv) <- the last d_conv inputs up to each row's last token, in place.

    history: (b, d_conv + l, d) from `conv_history`; lengths: (b,) tokens per row (at the front of the
    row), or None for all l. A row of length 0 keeps its state."""
    d_conv = conv_state.shape[-1]
    if lengths is None:
        conv_state.copy_(history[:, -d_conv:].transpose(1, 2))
        return
    rows = lengths[:, None] + torch.arange(d_conv, device=history.device)[None]  # (b, d_conv)
    conv_state.copy_(history.gather(1, rows[:, :, None].expand(-1, -1, history.shape[2])).transpose(1, 2))


def causal_conv_step(conv_state: torch.Tensor, x: torch.Tensor, conv: nn.Conv1d) -> torch.Tensor:
    """One new input per row, x (b, d): conv_state (b, d, d_conv) shifts it in (in place) and the
    SiLU of the conv at that position is returned, (b, d)."""
    conv_state.copy_(torch.cat([conv_state[:, :, 1:], x[:, :, None].to(conv_state.dtype)], dim=-1))
    out = torch.linalg.vecdot(conv_state, conv.weight[:, 0].to(conv_state.dtype))
    if conv.bias is not None:
        out = out + conv.bias
    return F.silu(out)


# --------------------------------------------------------------------------------------
# Padding: rows of a batch may hold their tokens in one contiguous block (left or right
# padding). Such rows are shifted so that every row starts at position 0; the scan then
# sees the same inputs as the row run alone, pads get dt = 0 (no decay, no input), and
# the conv state is read at each row's last real token.
# --------------------------------------------------------------------------------------


def _pack_left_index(mask: torch.Tensor) -> torch.Tensor:
    """mask: (b, l) of 0/1 with one contiguous block of ones per row -> (b, l) gather index that
    moves each row's block to the front (pads behind it)."""
    l = mask.shape[1]
    start = torch.argmax(mask.to(torch.int32), dim=1, keepdim=True)  # first real token (0 for an all-pad row)
    return (torch.arange(l, device=mask.device)[None] + start) % l


def _check_contiguous(mask: torch.Tensor) -> None:
    m = mask.to(torch.int8)
    rises = (m[:, 1:] > m[:, :-1]).sum(1) + (m[:, 0] > 0)
    if bool((rises > 1).any()):
        raise ValueError(
            "attention_mask must mark one contiguous block of tokens per row (left or right padding); "
            "got a row with a gap inside it. Pack or split such sequences before calling the model."
        )


# --------------------------------------------------------------------------------------
# Optional GPU kernels (mamba_ssm's Triton SSD kernels, causal_conv1d's CUDA conv update).
# Neither package is required: `get_mamba2_kernels` returns None unless the tensor is on CUDA
# and mamba_ssm's Triton functions import, and the mixer then uses the torch path above.
# MLMAMBA_DISABLE_KERNELS=1 forces the torch path everywhere (for comparisons).
# They live in this file because transformers 4.x copies only the modules that the model
# file imports directly into a remote-code folder's module cache.
# --------------------------------------------------------------------------------------

# --------------------------------------------------------------------------------------
# Scan routes of the non-causal mixers (shared with the Mamba-1 mixer).
# Tokens arrive in row-major order of an h x w grid (or as a flat sequence, h = 1). A route is
# the order in which one scan visits them; each route has its own conv, dt and SSM parameters,
# named with the route's suffix.
# --------------------------------------------------------------------------------------

SCAN_ROUTES: dict[str, tuple[str, ...]] = {
    "causal": ("forward",),
    "bidirectional": ("forward", "backward"),
    "cross": ("forward", "backward", "columns_forward", "columns_backward"),
}
ROUTE_SUFFIXES: dict[str, str] = {
    "forward": "",  # row-major order (the flattened sequence)
    "backward": "_b",  # row-major order reversed
    "columns_forward": "_c",  # column-major: (0,0), (1,0), ..., (h-1,0), (0,1), ...
    "columns_backward": "_c_b",  # column-major reversed
}


def check_scan(scan: str) -> str:
    if scan not in SCAN_ROUTES:
        raise ValueError(f"scan must be one of {tuple(SCAN_ROUTES)}, got {scan!r}")
    return scan


def route_order(route: str, h: int, w: int, device: torch.device | str | None = None) -> torch.Tensor:
    """The row-major positions (of an h x w grid) in the order the route visits them: a (h*w,) LongTensor.

    `tokens_in_route_order = tokens[:, route_order(route, h, w)]`. For "forward" and "backward" only
    h * w matters.
    """
    index = torch.arange(h * w, device=device)
    if route == "forward":
        return index
    if route == "backward":
        return index.flip(0)
    if route == "columns_forward":
        return index.view(h, w).t().reshape(-1)
    if route == "columns_backward":
        return index.view(h, w).t().reshape(-1).flip(0)
    raise ValueError(f"unknown route {route!r}; routes: {tuple(ROUTE_SUFFIXES)}")


def resolve_grid(scan: str, l: int, grid: tuple[int, int] | None) -> tuple[int, int]:
    """The (h, w) grid a scan of `l` tokens runs over: `grid` if given, else a square one for "cross",
    and (1, l) for the routes that only need the flat sequence."""
    if grid is not None:
        h, w = (int(v) for v in grid)
        if h * w != l:
            raise ValueError(f"grid={tuple(grid)} holds {h * w} tokens but the sequence has {l}")
        return h, w
    if scan != "cross":
        return 1, l
    side = math.isqrt(l)
    if side * side != l:
        raise ValueError(
            f"the cross scan needs the patch grid: {l} tokens are not a square grid; pass grid=(h, w)"
        )
    return side, side


class RoutePermutation:
    """Moves (b, l, ...) tensors between row-major order and one route's order (dimension 1)."""

    def __init__(self, route: str, h: int, w: int, device):
        self.route = route
        if route in ("forward", "backward"):
            self.order = self.inverse = None
        else:
            self.order = route_order(route, h, w, device)
            self.inverse = torch.argsort(self.order)

    def to_route(self, t: torch.Tensor) -> torch.Tensor:
        if self.route == "forward":
            return t
        if self.route == "backward":
            return t.flip(1)
        return t.index_select(1, self.order)

    def to_rows(self, t: torch.Tensor) -> torch.Tensor:
        if self.route == "forward":
            return t
        if self.route == "backward":
            return t.flip(1)
        return t.index_select(1, self.inverse)


@dataclass(frozen=True)
class Mamba2Kernels:
    chunk_scan: Callable
    state_update: Callable
    conv_update: Callable | None


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


@lru_cache(maxsize=None)
def _load_mamba2_kernels() -> Mamba2Kernels | None:
    try:
        selective_state_update = import_mamba_ssm("ops.triton.selective_state_update").selective_state_update
        mamba_chunk_scan_combined = import_mamba_ssm("ops.triton.ssd_combined").mamba_chunk_scan_combined
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


class Mamba2Mixer(nn.Module):
    """Mamba-2 SSD mixer. Input and output: (b, l, d_model).

    `scan="causal"`: causal scan with an optional decode state (language model).
    `scan="bidirectional"`: forward scan plus a scan over the reversed sequence (MSC connector).
    `scan="cross"`: four routes over an h x w patch grid (rows and columns, each both ways).
    The non-causal scans have one set of conv1d / dt_bias / A_log / D per route, named with the
    route's suffix (`route_suffixes`); in_proj, norm and out_proj are shared.
    """

    def __init__(
        self,
        d_model: int,
        d_state: int = 128,
        d_conv: int = 4,
        expand: int = 2,
        headdim: int = 64,
        ngroups: int = 1,
        chunk_size: int = 256,
        conv_bias: bool = True,
        bias: bool = False,
        norm_eps: float = 1e-5,
        dt_min: float = 0.001,
        dt_max: float = 0.1,
        dt_init_floor: float = 1e-4,
        A_init_range: tuple[float, float] = (1, 16),
        dt_limit: tuple[float, float] = (0.0, float("inf")),
        scan: str = "causal",
    ):
        super().__init__()
        self.d_model = d_model
        self.d_state = d_state
        self.d_conv = d_conv
        self.d_inner = expand * d_model
        self.headdim = headdim
        self.ngroups = ngroups
        if self.d_inner % headdim:
            raise ValueError(f"expand * d_model = {self.d_inner} must be a multiple of headdim = {headdim}")
        self.nheads = self.d_inner // headdim
        if self.nheads % ngroups:
            raise ValueError(f"nheads = {self.nheads} must be a multiple of ngroups = {ngroups}")
        self.chunk_size = chunk_size
        self.dt_min, self.dt_max, self.dt_init_floor = dt_min, dt_max, dt_init_floor
        self.A_init_range = tuple(A_init_range)
        self.dt_limit = tuple(dt_limit)
        self.scan = check_scan(scan)
        self.conv_dim = self.d_inner + 2 * ngroups * d_state

        self.in_proj = nn.Linear(d_model, 2 * self.d_inner + 2 * ngroups * d_state + self.nheads, bias=bias)
        for suffix in self.route_suffixes:  # "" first: the causal scan's names come first in the state dict
            conv = nn.Conv1d(
                self.conv_dim, self.conv_dim, d_conv, groups=self.conv_dim, padding=d_conv - 1, bias=conv_bias
            )
            setattr(self, "conv1d" + suffix, conv)
            setattr(self, "dt_bias" + suffix, nn.Parameter(torch.empty(self.nheads)))
            setattr(self, "A_log" + suffix, nn.Parameter(torch.empty(self.nheads)))
            setattr(self, "D" + suffix, nn.Parameter(torch.ones(self.nheads)))
        self.norm = RMSNormGated(self.d_inner, group_size=self.d_inner // ngroups, eps=norm_eps)
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=bias)
        self.reset_ssm_parameters()

    @torch.no_grad()
    def reset_ssm_parameters(self) -> None:
        """mamba_ssm's initialisation of dt_bias (inverse softplus of a log-uniform dt), A_log and D, every route."""
        for suffix in self.route_suffixes:
            dt_bias, A_log, D = (getattr(self, name + suffix) for name in ("dt_bias", "A_log", "D"))
            if dt_bias.device.type == "meta":
                continue
            dt = torch.exp(
                torch.rand(self.nheads, device=dt_bias.device) * (math.log(self.dt_max) - math.log(self.dt_min))
                + math.log(self.dt_min)
            ).clamp(min=self.dt_init_floor)
            dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))
            A_log.copy_(torch.log(torch.empty(self.nheads, device=A_log.device).uniform_(*self.A_init_range)))
            D.fill_(1.0)

    @property
    def routes(self) -> tuple[str, ...]:
        """The routes this mixer scans (`SCAN_ROUTES[self.scan]`)."""
        return SCAN_ROUTES[self.scan]

    @property
    def route_suffixes(self) -> tuple[str, ...]:
        """Parameter-name suffix of each route: ("",), ("", "_b") or ("", "_b", "_c", "_c_b")."""
        return tuple(ROUTE_SUFFIXES[route] for route in self.routes)

    # ---- pieces shared by all routes --------------------------------------------------------

    def _split(self, zxbcdt: torch.Tensor):
        return torch.split(zxbcdt, [self.d_inner, self.conv_dim, self.nheads], dim=-1)

    def _dt(self, dt_raw: torch.Tensor, dt_bias: torch.Tensor) -> torch.Tensor:
        dt = F.softplus(dt_raw.float() + dt_bias.float())
        if self.dt_limit != (0.0, float("inf")):
            dt = dt.clamp(*self.dt_limit)
        return dt

    def _scan(self, xBC, dt, A_log, D, initial_state=None):
        """xBC: (b, l, conv_dim) after conv; dt: (b, l, h) -> y (b, l, d_inner), final state."""
        b, l, _ = xBC.shape
        x, B, C = torch.split(xBC, [self.d_inner, self.ngroups * self.d_state, self.ngroups * self.d_state], dim=-1)
        A = -torch.exp(A_log.float())
        kernels = get_mamba2_kernels(xBC)
        args = (
            x.reshape(b, l, self.nheads, self.headdim),
            dt,
            A,
            B.reshape(b, l, self.ngroups, self.d_state),
            C.reshape(b, l, self.ngroups, self.d_state),
            self.chunk_size,
        )
        if kernels is not None:
            y, state = kernels.chunk_scan(*args, D=D, initial_state=initial_state)
        else:
            args = args[:-1] + (min(self.chunk_size, TORCH_CHUNK_SIZE),)
            y, state = ssd_chunk_scan(*args, D=D, initial_state=initial_state)
        return y.reshape(b, l, self.d_inner), state

    # ---- forward ----------------------------------------------------------------------------

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        conv_state: torch.Tensor | None = None,
        ssm_state: torch.Tensor | None = None,
        grid: tuple[int, int] | None = None,
    ) -> torch.Tensor:
        """
        Args:
            hidden_states: (b, l, d_model).
            attention_mask: (b, l) with 1 for tokens and 0 for padding, one contiguous block of tokens
                per row. Padding never changes the states, so each row equals the row run alone.
            conv_state: (b, conv_dim, d_conv), the last d_conv inputs of the conv; read and updated in place.
            ssm_state: (b, nheads, headdim, d_state); read and updated in place. Give both states or neither.
                With states, `l == 1` takes the recurrent step and `l > 1` continues the chunked scan.
            grid: (h, w) of the patch grid whose tokens arrive row-major (h * w == l). Needed by
                `scan="cross"` unless l is a perfect square (then a square grid is taken); the other
                scans only check it.

        Returns:
            (b, l, d_model). Outputs at padding positions are unspecified.
        """
        if self.scan != "causal":
            if conv_state is not None or ssm_state is not None:
                raise ValueError(f"a {self.scan} scan has no decode state")
            return self._forward_routes(hidden_states, attention_mask, grid)
        if grid is not None:
            resolve_grid(self.scan, hidden_states.shape[1], grid)
        if (conv_state is None) != (ssm_state is None):
            raise ValueError("pass both conv_state and ssm_state, or neither")
        if conv_state is not None and hidden_states.shape[1] == 1 and attention_mask is None:
            return self._step(hidden_states, conv_state, ssm_state)
        return self._forward_causal(hidden_states, attention_mask, conv_state, ssm_state)

    def _forward_causal(self, u, attention_mask, conv_state, ssm_state):
        unpack = None
        if attention_mask is not None and not bool(attention_mask.all()):
            _check_contiguous(attention_mask)
            index = _pack_left_index(attention_mask)
            u = u.gather(1, index[:, :, None].expand_as(u))
            attention_mask = attention_mask.gather(1, index)
            unpack = torch.argsort(index, dim=1)
        else:
            attention_mask = None

        z, xBC, dt_raw = self._split(self.in_proj(u))
        if attention_mask is not None:
            # Tokens sit at the front of every row now: pads at the end must not enter the conv state.
            xBC = xBC * attention_mask[:, :, None].to(xBC.dtype)
        history = conv_history(xBC, conv_state, self.d_conv)
        xBC = causal_conv_silu(history, self.conv1d)
        dt = self._dt(dt_raw, self.dt_bias)
        if attention_mask is not None:
            dt = dt * attention_mask[:, :, None].to(dt.dtype)
        y, final_state = self._scan(xBC, dt, self.A_log, self.D, initial_state=ssm_state)

        if conv_state is not None:
            update_conv_state(conv_state, history, attention_mask.sum(1) if attention_mask is not None else None)
            ssm_state.copy_(final_state)

        y = self.norm(y, z)
        out = self.out_proj(y.to(u.dtype))
        if unpack is not None:
            out = out.gather(1, unpack[:, :, None].expand_as(out))
        return out

    def _step(self, u, conv_state, ssm_state):
        """One token: u (b, 1, d_model)."""
        z, xBC, dt_raw = self._split(self.in_proj(u[:, 0]))
        kernels = get_mamba2_kernels(u)
        if kernels is not None and kernels.conv_update is not None:
            xBC = kernels.conv_update(xBC, conv_state, self.conv1d.weight[:, 0], self.conv1d.bias)
        else:
            xBC = causal_conv_step(conv_state, xBC, self.conv1d)
        x, B, C = torch.split(xBC, [self.d_inner, self.ngroups * self.d_state, self.ngroups * self.d_state], dim=-1)
        b = u.shape[0]
        A = -torch.exp(self.A_log.float())
        x = x.reshape(b, self.nheads, self.headdim)
        B = B.reshape(b, self.ngroups, self.d_state)
        C = C.reshape(b, self.ngroups, self.d_state)
        if kernels is not None and self.dt_limit == (0.0, float("inf")):
            y = kernels.state_update(ssm_state, x, dt_raw, A, B, C, self.D, self.dt_bias)
        else:
            y = ssd_step(ssm_state, x, self._dt(dt_raw, self.dt_bias), A, B, C, self.D)
        y = self.norm(y.reshape(b, self.d_inner), z)
        return self.out_proj(y.to(u.dtype))[:, None]

    def _forward_routes(self, u, attention_mask, grid):
        if attention_mask is not None and not bool(attention_mask.all()):
            raise ValueError(f"the {self.scan} scan connector takes full image grids; attention_mask is not supported")
        h, w = resolve_grid(self.scan, u.shape[1], grid)
        z, xBC, dt_raw = self._split(self.in_proj(u))
        y = None
        for route, suffix in zip(self.routes, self.route_suffixes):
            perm = RoutePermutation(route, h, w, u.device)
            conv, dt_bias, A_log, D = (getattr(self, name + suffix) for name in ("conv1d", "dt_bias", "A_log", "D"))
            xBC_r = causal_conv_silu(conv_history(perm.to_route(xBC), None, self.d_conv), conv)
            y_r, _ = self._scan(xBC_r, self._dt(perm.to_route(dt_raw), dt_bias), A_log, D)
            # As released: each route is gated and normalised on its own (in row-major order), then
            # the routes are averaged.
            y_r = self.norm(perm.to_rows(y_r), z)
            y = y_r if y is None else y + y_r
        y = y / len(self.routes)
        return self.out_proj(y.to(u.dtype))
