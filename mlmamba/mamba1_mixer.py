"""The Mamba-1 (selective scan) mixer: Cobra's language model and VL-Mamba's vision selective scan.

Parameter names and initialisation follow state-spaces/mamba `mamba_ssm/modules/mamba_simple.py`
(and transformers' `MambaMixer`), so that released checkpoints load by renaming prefixes only:

    in_proj   Linear(d_model -> [x: d_inner | z: d_inner])
    conv1d    depthwise causal Conv1d over x (kernel d_conv, with bias), followed by SiLU
    x_proj    Linear(d_inner -> [dt: dt_rank | B: d_state | C: d_state]), no bias
    dt_proj   Linear(dt_rank -> d_inner) with bias; dt = softplus(dt_proj(dt))
    A_log     (d_inner, d_state), A = -exp(A_log)
    D         (d_inner,) skip connection
    out_proj  Linear(d_inner -> d_model)

    h_t = exp(dt_t A) h_{t-1} + dt_t x_t B_t,   y_t = C_t . h_t + D x_t,   out = out_proj(y * silu(z))

Non-causal scans (`scan=`, routes as in the Mamba-2 mixer, see `mamba2_mixer.SCAN_ROUTES`):
"bidirectional" (BSM) adds a scan over the reversed sequence with `conv1d_b`, `x_proj_b`,
`dt_proj_b`, `A_log_b`, `D_b`; "cross" (CSM) scans an h x w patch grid along rows and columns,
both ways, with suffixes "", "_b", "_c", "_c_b". in_proj and out_proj are shared; the output is
`out_proj(mean over routes of y_r * silu(z))`, each y_r put back in row-major order.
(Vision Mamba's "v2" bimamba names the backward A `A_b_log`; rename it to `A_log_b` to load it.)

Shapes: b = batch, l = sequence, d = d_inner (channels), n = d_state, c = chunks, T = chunk length.

Scans (pure torch, fp32 math):
  * `selective_scan`: whole sequences (prefill, training), differentiable. The sequence is cut into
    c chunks of T tokens that are scanned side by side: a first pass runs every chunk from a zero
    state to get what each adds to the state by its end, a short loop over the c chunks carries the
    state across them (a chunk's total decay is exp(sum dt * A)), and a second pass reruns every
    chunk from its true starting state and reads the outputs. That is 2T + c Python steps instead of
    l, each on a (b, c, d, n) tensor, with the recurrence's own arithmetic (no exp of positive
    numbers, so nothing overflows whatever dt * A is). With one chunk (T = l) it is the plain
    recurrence. Memory: O(b * c * d * n) per step; autograd keeps every step's state, O(b * l * d * n).
    (The SSD form of the Mamba-2 mixer, with (T x T) decay matrices, does not pay off here: A differs
    per channel and state, so it needs T times the recurrence's exp() calls: 40x slower on a CPU at T = 8.)
  * `selective_step`: one token (decoding), O(d * n).
  * `selective_scan_naive`: the per-token reference (as mamba_ssm's `selective_scan_ref`), for tests.
On CUDA, mamba_ssm's and causal_conv1d's kernels are used where importable (see `get_mamba1_kernels`).
"""

import math
import os
from dataclasses import dataclass
from functools import lru_cache
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .mamba2_mixer import (
    EXP_FLOOR,
    ROUTE_SUFFIXES,
    SCAN_ROUTES,
    RoutePermutation,
    _check_contiguous,
    _pack_left_index,
    causal_conv_silu,
    causal_conv_step,
    check_scan,
    conv_history,
    import_mamba_ssm,
    resolve_grid,
    update_conv_state,
)


# --------------------------------------------------------------------------------------
# Scans (pure torch). All math in fp32.
# --------------------------------------------------------------------------------------


def default_chunk_size(l: int) -> int:
    """Chunk length `selective_scan` uses when none is given: about sqrt(l / 2), which minimises the
    2T + l/T Python steps. (On a 2-core CPU at b=1, l=1024, d=1536, n=16 it was also the fastest choice,
    ahead of a single chunk: each step then works on c times more numbers at once.)"""
    return max(1, math.isqrt(max(l // 2, 1)))


def _advance(h, dt_t, dtx_t, B_t, A):
    """h (..., d, n) <- exp(dt A) h + (dt x) B for one token; dt_t, dtx_t (..., d); B_t (..., n)."""
    dA = dt_t[..., None] * A
    if torch.is_grad_enabled():
        return h * torch.exp(dA.clamp(min=EXP_FLOOR)) + dtx_t[..., None] * B_t[..., None, :]
    return h.mul_(dA.clamp_(min=EXP_FLOOR).exp_()).addcmul_(dtx_t[..., None], B_t[..., None, :])


def selective_scan(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    initial_state: torch.Tensor | None = None,
    chunk_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Selective scan: h_t = exp(dt_t A) h_{t-1} + dt_t x_t B_t,  y_t = C_t . h_t + D x_t.

    Args:
        x: (b, l, d) inputs.
        dt: (b, l, d) step sizes, already `softplus(dt_proj(...) + bias)`; a zero step leaves the state untouched.
        A: (d, n) negative decay rates (-exp(A_log)).
        B, C: (b, l, n) input and output projections.
        D: (d,) skip connection.
        initial_state: (b, d, n) state before the first token, or None for zeros (not modified).
        chunk_size: tokens per chunk (see the module docstring); the result does not depend on it
            (up to rounding). None: `default_chunk_size`.

    Returns:
        y: (b, l, d) in x's dtype and final_state: (b, d, n) in fp32.
    """
    b, l, d = x.shape
    n = A.shape[-1]
    dtype = x.dtype
    if chunk_size is None:
        chunk_size = default_chunk_size(l)
    T = max(1, min(int(chunk_size), l))
    pad = (-l) % T
    c = (l + pad) // T
    x32, dt32, B32, C32 = x.float(), dt.float(), B.float(), C.float()
    if pad:
        # Zero steps leave the state as it is, so padding does not change it.
        x32, dt32, B32, C32 = (F.pad(t, (0, 0, 0, pad)) for t in (x32, dt32, B32, C32))
    A = A.float()
    dt_c = dt32.view(b, c, T, d)
    steps = list(zip(dt_c.unbind(2), (dt32 * x32).view(b, c, T, d).unbind(2), B32.view(b, c, T, n).unbind(2)))

    state = initial_state.float() if initial_state is not None else x32.new_zeros(b, d, n)
    if c == 1:
        h = state[:, None].clone()
    else:
        # 1. What each chunk adds to the state by its end, starting from zero (all chunks at once).
        h = x32.new_zeros(b, c, d, n)
        for step in steps:
            h = _advance(h, *step, A)
        # 2. Carry the state across chunks: a whole chunk decays the state by exp(sum_t dt_t A).
        chunk_decay = torch.exp((dt_c.sum(2)[..., None] * A).clamp(min=EXP_FLOOR))  # (b, c, d, n)
        starts = []
        for i in range(c):
            starts.append(state)
            state = state * chunk_decay[:, i] + h[:, i]
        h = torch.stack(starts, dim=1)  # (b, c, d, n): the state entering each chunk
    # 3. Rerun every chunk from its starting state and read the outputs.
    ys = []
    for step, C_t in zip(steps, C32.view(b, c, T, n).unbind(2)):
        h = _advance(h, *step, A)
        ys.append(torch.matmul(h, C_t[..., None]))  # (b, c, d, 1)
    y = torch.cat(ys, dim=-1).transpose(2, 3).reshape(b, c * T, d)[:, :l]
    if D is not None:
        y = y + x32[:, :l] * D.float()
    return y.to(dtype), h[:, -1]


def selective_step(
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
        state: (b, d, n) SSM state (any float dtype; updated in place).
        x: (b, d); dt: (b, d) (already softplus'd); A: (d, n); B, C: (b, n); D: (d,).

    Returns:
        y: (b, d) in x's dtype.
    """
    x32, dt32 = x.float(), dt.float()
    decay = torch.exp(dt32[..., None] * A.float())  # (b, d, n)
    if state.dtype == torch.float32 and not torch.is_grad_enabled():
        # Decoding: update the state where it lies, without (b, d, n) temporaries beyond the decay.
        new_state = state.mul_(decay).baddbmm_((dt32 * x32)[..., None], B.float()[:, None, :])
    else:
        new_state = state.float() * decay + (dt32 * x32)[..., None] * B.float()[:, None, :]
        state.copy_(new_state)
    y = torch.matmul(new_state, C.float()[..., None])[..., 0]
    if D is not None:
        y = y + x32 * D.float()
    return y.to(x.dtype)


def selective_scan_naive(x, dt, A, B, C, D=None, initial_state=None):
    """Reference recurrence, one token at a time, differentiable (tests only). Arguments as `selective_scan`."""
    b, l, d = x.shape
    n = A.shape[-1]
    A = A.float()
    state = initial_state.float() if initial_state is not None else x.new_zeros(b, d, n, dtype=torch.float32)
    ys = []
    for x_t, dt_t, B_t, C_t in zip(x.float().unbind(1), dt.float().unbind(1), B.float().unbind(1), C.float().unbind(1)):
        state = state * torch.exp(dt_t[:, :, None] * A) + (dt_t * x_t)[:, :, None] * B_t[:, None, :]
        y = (state * C_t[:, None, :]).sum(-1)
        if D is not None:
            y = y + x_t * D.float()
        ys.append(y.to(x.dtype))
    return torch.stack(ys, dim=1), state


# --------------------------------------------------------------------------------------
# Optional GPU kernels: mamba_ssm's selective scan (CUDA extension `selective_scan_cuda`) and
# Triton `selective_state_update`, causal_conv1d's `causal_conv1d_fn` / `causal_conv1d_update`.
# None is required: each is used only on CUDA tensors, only when it imports, and
# MLMAMBA_DISABLE_KERNELS=1 disables them all; the mixer then uses the torch code above.
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Mamba1Kernels:
    # scan(x (b, d, l), dt_raw (b, d, l), A (d, n) fp32, B, C (b, n, l), D (d,) fp32, dt_bias (d,) fp32)
    #   -> y (b, d, l) in x's dtype (D included, no gate), last state (b, d, n) fp32. No initial state.
    scan: Callable | None
    # state_update(state (b, d, n), x (b, d), dt_raw (b, d), A, B, C (b, n), D, dt_bias) -> y (b, d); state in place
    state_update: Callable | None
    # conv_fn(x (b, d, l), weight (d, k), bias) -> silu(causal conv) (b, d, l), zeros before the first input
    conv_fn: Callable | None
    # conv_update(x (b, d), conv_state (b, d, k), weight (d, k), bias) -> silu(conv) (b, d); state in place
    conv_update: Callable | None


@lru_cache(maxsize=None)
def _load_mamba1_kernels() -> Mamba1Kernels | None:
    scan = state_update = conv_fn = conv_update = None
    try:
        # The compiled extension: recent mamba_ssm versions import it lazily and fail only when called.
        import selective_scan_cuda  # noqa: F401
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn
    except Exception:
        selective_scan_fn = None
    if selective_scan_fn is not None:

        def scan(x, dt_raw, A, B, C, D, dt_bias):
            y, last_state = selective_scan_fn(
                x, dt_raw, A, B, C, D, z=None, delta_bias=dt_bias, delta_softplus=True, return_last_state=True
            )
            return y, last_state.float()

    try:
        selective_state_update = import_mamba_ssm("ops.triton.selective_state_update").selective_state_update
    except Exception:
        selective_state_update = None
    if selective_state_update is not None:

        def state_update(state, x, dt_raw, A, B, C, D, dt_bias):
            return selective_state_update(state, x, dt_raw, A, B, C, D=D, z=None, dt_bias=dt_bias, dt_softplus=True)

    try:
        from causal_conv1d import causal_conv1d_fn, causal_conv1d_update
    except Exception:
        causal_conv1d_fn = causal_conv1d_update = None
    if causal_conv1d_fn is not None:

        def conv_fn(x, weight, bias):
            return causal_conv1d_fn(x.contiguous(), weight, bias, activation="silu")

        def conv_update(x, conv_state, weight, bias):
            return causal_conv1d_update(x, conv_state, weight, bias, "silu")

    if scan is None and state_update is None and conv_fn is None:
        return None
    return Mamba1Kernels(scan=scan, state_update=state_update, conv_fn=conv_fn, conv_update=conv_update)


def get_mamba1_kernels(like: torch.Tensor) -> Mamba1Kernels | None:
    """The kernels for a tensor on CUDA when importable and not disabled; None otherwise."""
    if not like.is_cuda or os.environ.get("MLMAMBA_DISABLE_KERNELS", "0") == "1":
        return None
    return _load_mamba1_kernels()


# --------------------------------------------------------------------------------------
# The mixer
# --------------------------------------------------------------------------------------


class Mamba1Mixer(nn.Module):
    """Mamba-1 selective-scan mixer. Input and output: (b, l, d_model).

    `scan="causal"`: causal scan with an optional decode state (language model, as mamba_simple's `Mamba`).
    `scan="bidirectional"`: forward scan plus a scan over the reversed sequence (BSM).
    `scan="cross"`: four routes over an h x w patch grid, rows and columns both ways (CSM).
    The non-causal scans have one conv1d / x_proj / dt_proj / A_log / D per route, named with the
    route's suffix (`route_suffixes`); in_proj and out_proj are shared.

    Arguments as mamba_simple's `Mamba`; `chunk_size` is passed to `selective_scan` (None: automatic).
    """

    def __init__(
        self,
        d_model: int,
        d_state: int = 16,
        d_conv: int = 4,
        expand: int = 2,
        dt_rank: int | str = "auto",
        dt_min: float = 0.001,
        dt_max: float = 0.1,
        dt_init: str = "random",
        dt_scale: float = 1.0,
        dt_init_floor: float = 1e-4,
        conv_bias: bool = True,
        bias: bool = False,
        scan: str = "causal",
        chunk_size: int | None = None,
    ):
        super().__init__()
        self.d_model = d_model
        self.d_state = d_state
        self.d_conv = d_conv
        self.expand = expand
        self.d_inner = int(expand * d_model)
        self.dt_rank = math.ceil(d_model / 16) if dt_rank == "auto" else int(dt_rank)
        if dt_init not in ("random", "constant"):
            raise ValueError(f"dt_init must be 'random' or 'constant', got {dt_init!r}")
        self.dt_min, self.dt_max, self.dt_init_floor = dt_min, dt_max, dt_init_floor
        self.dt_init, self.dt_scale = dt_init, dt_scale
        self.scan = check_scan(scan)
        self.chunk_size = chunk_size

        self.in_proj = nn.Linear(d_model, 2 * self.d_inner, bias=bias)
        for suffix in self.route_suffixes:  # per route, in mamba_simple's order (and random-number order)
            setattr(self, "conv1d" + suffix, nn.Conv1d(
                self.d_inner, self.d_inner, d_conv, groups=self.d_inner, padding=d_conv - 1, bias=conv_bias
            ))  # fmt: skip
            setattr(self, "x_proj" + suffix, nn.Linear(self.d_inner, self.dt_rank + 2 * d_state, bias=False))
            setattr(self, "dt_proj" + suffix, nn.Linear(self.dt_rank, self.d_inner, bias=True))
            setattr(self, "A_log" + suffix, nn.Parameter(torch.empty(self.d_inner, d_state)))
            setattr(self, "D" + suffix, nn.Parameter(torch.ones(self.d_inner)))
            self._reset_route(suffix)
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=bias)

    @property
    def routes(self) -> tuple[str, ...]:
        """The routes this mixer scans (`SCAN_ROUTES[self.scan]`)."""
        return SCAN_ROUTES[self.scan]

    @property
    def route_suffixes(self) -> tuple[str, ...]:
        """Parameter-name suffix of each route: ("",), ("", "_b") or ("", "_b", "_c", "_c_b")."""
        return tuple(ROUTE_SUFFIXES[route] for route in self.routes)

    @torch.no_grad()
    def reset_ssm_parameters(self) -> None:
        """mamba_simple's initialisation of dt_proj, A_log and D, for every route."""
        for suffix in self.route_suffixes:
            self._reset_route(suffix)

    @torch.no_grad()
    def _reset_route(self, suffix: str) -> None:
        dt_proj, A_log, D = (getattr(self, name + suffix) for name in ("dt_proj", "A_log", "D"))
        # mamba_ssm's flags for its own init and optimiser groups: keep this bias, no weight decay on A, D.
        dt_proj.bias._no_reinit = True
        A_log._no_weight_decay = True
        D._no_weight_decay = True
        if dt_proj.weight.device.type == "meta":
            return
        dt_init_std = self.dt_rank**-0.5 * self.dt_scale
        if self.dt_init == "constant":
            dt_proj.weight.fill_(dt_init_std)
        else:
            dt_proj.weight.uniform_(-dt_init_std, dt_init_std)
        # dt_proj.bias = inverse softplus of a log-uniform dt in [dt_min, dt_max] (floored).
        dt = torch.exp(
            torch.rand(self.d_inner, device=dt_proj.bias.device) * (math.log(self.dt_max) - math.log(self.dt_min))
            + math.log(self.dt_min)
        ).clamp(min=self.dt_init_floor)
        dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))
        # S4D-real: A = -(1, 2, ..., d_state) for every channel.
        A = torch.arange(1, self.d_state + 1, dtype=torch.float32, device=A_log.device)
        A_log.copy_(torch.log(A).expand_as(A_log))
        D.fill_(1.0)

    # ---- one route: conv, projections, scan -------------------------------------------------

    def _scan_route(self, history, suffix, initial_state=None, mask=None):
        """history: (b, d_conv + l, d_inner) from `conv_history` (the in_proj half, in the route's order,
        after the conv state) -> y (b, l, d_inner) with the D skip, not gated, and the final SSM state
        (b, d_inner, d_state) fp32."""
        conv, x_proj, dt_proj, A_log, D = (
            getattr(self, name + suffix) for name in ("conv1d", "x_proj", "dt_proj", "A_log", "D")
        )
        l = history.shape[1] - self.d_conv
        kernels = get_mamba1_kernels(history)
        if kernels is not None and kernels.conv_fn is not None:  # channels first: (b, d_inner, d_conv - 1 + l)
            xc = kernels.conv_fn(history[:, 1:].transpose(1, 2), conv.weight[:, 0], conv.bias)[:, :, -l:].transpose(1, 2)
        else:
            xc = causal_conv_silu(history, conv)  # (b, l, d_inner)

        dt_low, B, C = torch.split(x_proj(xc), [self.dt_rank, self.d_state, self.d_state], dim=-1)
        dt_raw = F.linear(dt_low, dt_proj.weight)  # (b, l, d_inner), bias added with the softplus
        A = -torch.exp(A_log.float())

        use_kernel = kernels is not None and kernels.scan is not None
        if use_kernel and initial_state is not None:
            use_kernel = not bool(initial_state.any())  # the kernel starts from a zero state
        if use_kernel:
            if mask is not None:
                # softplus(-1e4 + bias) is exactly 0 in fp32: pads take no step and leave the state as it is.
                dt_raw = dt_raw.masked_fill(~mask.bool()[:, :, None], -1e4)
            y, state = kernels.scan(
                xc.transpose(1, 2), dt_raw.transpose(1, 2), A, B.transpose(1, 2), C.transpose(1, 2), D.float(), dt_proj.bias.float()
            )
            return y.transpose(1, 2), state
        dt = F.softplus(dt_raw.float() + dt_proj.bias.float())
        if mask is not None:
            dt = dt * mask[:, :, None].to(dt.dtype)
        return selective_scan(
            xc, dt, A, B, C, D=D, initial_state=initial_state, chunk_size=self.chunk_size
        )

    @staticmethod
    def _gate(y, z):
        """y * silu(z), in fp32, in z's dtype (as the kernels' fused gate)."""
        return (y.float() * F.silu(z.float())).to(z.dtype)

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
                per row (left or right padding). Padding never changes the states, so each row equals
                the row run alone.
            conv_state: (b, d_inner, d_conv), the last d_conv inputs of the conv; read and updated in place.
            ssm_state: (b, d_inner, d_state), fp32; read and updated in place. Give both states or neither.
                With states, `l == 1` takes the recurrent step and `l > 1` continues the scan.
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

        x, z = self.in_proj(u).chunk(2, dim=-1)
        if attention_mask is not None:
            # Tokens sit at the front of every row now: pads at the end must not enter the conv state.
            x = x * attention_mask[:, :, None].to(x.dtype)
        history = conv_history(x, conv_state, self.d_conv)
        y, final_state = self._scan_route(history, "", ssm_state, attention_mask)

        if conv_state is not None:
            update_conv_state(conv_state, history, attention_mask.sum(1) if attention_mask is not None else None)
            ssm_state.copy_(final_state)

        out = self.out_proj(self._gate(y, z))
        if unpack is not None:
            out = out.gather(1, unpack[:, :, None].expand_as(out))
        return out

    def _step(self, u, conv_state, ssm_state):
        """One token: u (b, 1, d_model)."""
        x, z = self.in_proj(u[:, 0]).chunk(2, dim=-1)  # (b, d_inner) each
        kernels = get_mamba1_kernels(u)
        if kernels is not None and kernels.conv_update is not None:
            x = kernels.conv_update(x, conv_state, self.conv1d.weight[:, 0], self.conv1d.bias)
        else:
            x = causal_conv_step(conv_state, x, self.conv1d).to(u.dtype)
        dt_low, B, C = torch.split(self.x_proj(x), [self.dt_rank, self.d_state, self.d_state], dim=-1)
        dt_raw = F.linear(dt_low, self.dt_proj.weight)
        A = -torch.exp(self.A_log.float())
        if kernels is not None and kernels.state_update is not None:
            y = kernels.state_update(ssm_state, x, dt_raw, A, B, C, self.D, self.dt_proj.bias)
        else:
            dt = F.softplus(dt_raw.float() + self.dt_proj.bias.float())
            y = selective_step(ssm_state, x, dt, A, B, C, self.D)
        return self.out_proj(self._gate(y, z))[:, None]

    def _forward_routes(self, u, attention_mask, grid):
        if attention_mask is not None and not bool(attention_mask.all()):
            raise ValueError(f"the {self.scan} scan takes full image grids; attention_mask is not supported")
        h, w = resolve_grid(self.scan, u.shape[1], grid)
        x, z = self.in_proj(u).chunk(2, dim=-1)
        y = None
        for route, suffix in zip(self.routes, self.route_suffixes):
            perm = RoutePermutation(route, h, w, u.device)
            y_r, _ = self._scan_route(conv_history(perm.to_route(x), None, self.d_conv), suffix)
            y_r = perm.to_rows(y_r).float()
            y = y_r if y is None else y + y_r
        # mean over routes of y_r * silu(z) (the gate is the same for every route)
        return self.out_proj(self._gate(y / len(self.routes), z))
