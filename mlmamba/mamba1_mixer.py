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

Non-causal scans (`scan=`, routes as in the Mamba-2 mixer, see `ssm_ops.SCAN_ROUTES`):
"bidirectional" (BSM) adds a scan over the reversed sequence with `conv1d_b`, `x_proj_b`,
`dt_proj_b`, `A_log_b`, `D_b`; "cross" (CSM) scans an h x w patch grid along rows and columns,
both ways, with suffixes "", "_b", "_c", "_c_b". in_proj and out_proj are shared; the output is
`out_proj(mean over routes of y_r * silu(z))`, each y_r put back in row-major order.
(Vision Mamba's "v2" bimamba names the backward A `A_b_log`; rename it to `A_log_b` to load it.)

Shapes: b = batch, l = sequence, d = d_inner (channels), n = d_state, c = chunks, q = chunk length.

Scans (pure torch, fp32 math):
  * `selective_scan`: whole sequences (prefill, training), differentiable. The sequence is cut into
    c chunks of q tokens that are scanned side by side: a first pass runs every chunk from a zero
    state to get what each adds to the state by its end, a short loop over the c chunks carries the
    state across them (a chunk's total decay is exp(sum dt * A)), and a second pass reruns every
    chunk from its true starting state and reads the outputs. That is 2q + c Python steps instead of
    l, each on a (b, c, d, n) tensor, with the recurrence's own arithmetic (no exp of positive
    numbers, so nothing overflows whatever dt * A is). With one chunk (q = l) it is the plain
    recurrence. Memory: O(b * c * d * n) per step; autograd keeps every step's state, O(b * l * d * n).
    (The SSD form of the Mamba-2 mixer, with (q x q) decay matrices, does not pay off here: A differs
    per channel and state, so it needs q times the recurrence's exp() calls; see docs/PERFORMANCE.md.)
  * `selective_step`: one token (decoding), O(d * n).
On CUDA, mamba_ssm's and causal_conv1d's kernels stand in for them where they import (see `kernels.py`).
"""

import math

import torch
import torch.nn.functional as F
from torch import nn

from .kernels import get_kernels
from .ssm_ops import (
    EXP_FLOOR,
    ScanMixer,
    causal_conv_silu,
    causal_conv_step,
    check_scan,
    inverse_softplus_dt,
    linear_weight_and_bias,
)


def default_chunk_size(l: int) -> int:
    """Chunk length `selective_scan` uses when none is given: about sqrt(l / 2), which minimises the
    2q + l/q Python steps (and beats a single chunk: each step works on c times more numbers at once)."""
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
    q = max(1, min(int(chunk_size), l))
    pad = (-l) % q
    c = (l + pad) // q
    x32, dt32, B32, C32 = x.float(), dt.float(), B.float(), C.float()
    if pad:
        # Zero steps leave the state as it is, so padding does not change it.
        x32, dt32, B32, C32 = (F.pad(t, (0, 0, 0, pad)) for t in (x32, dt32, B32, C32))
    A = A.float()
    dt_c = dt32.view(b, c, q, d)
    steps = list(zip(dt_c.unbind(2), (dt32 * x32).view(b, c, q, d).unbind(2), B32.view(b, c, q, n).unbind(2)))

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
    for step, C_t in zip(steps, C32.view(b, c, q, n).unbind(2)):
        h = _advance(h, *step, A)
        ys.append(torch.matmul(h, C_t[..., None]))  # (b, c, d, 1)
    y = torch.cat(ys, dim=-1).transpose(2, 3).reshape(b, c * q, d)[:, :l]
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


class Mamba1Mixer(ScanMixer):
    """Mamba-1 selective-scan mixer (mamba_simple's `Mamba`). Input and output: (b, l, d_model); routes and
    states as in `ScanMixer`.

    States: conv_state (b, d_inner, d_conv), ssm_state (b, d_inner, d_state).
    Arguments as mamba_simple's `Mamba`; `chunk_size` is passed to `selective_scan` (None: automatic).
    `initialize=False` leaves the SSM parameters to the caller (`MLMambaPreTrainedModel._init_weights`).
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
        initialize: bool = True,
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
        for suffix in self.route_suffixes:  # per route, in mamba_simple's order
            conv = nn.Conv1d(
                self.d_inner, self.d_inner, d_conv, groups=self.d_inner, padding=d_conv - 1, bias=conv_bias
            )
            setattr(self, "conv1d" + suffix, conv)
            setattr(self, "x_proj" + suffix, nn.Linear(self.d_inner, self.dt_rank + 2 * d_state, bias=False))
            setattr(self, "dt_proj" + suffix, nn.Linear(self.dt_rank, self.d_inner, bias=True))
            setattr(self, "A_log" + suffix, nn.Parameter(torch.empty(self.d_inner, d_state)))
            setattr(self, "D" + suffix, nn.Parameter(torch.ones(self.d_inner)))
            # mamba_ssm's flags for its own init and optimiser groups: keep this bias, no weight decay on A, D.
            getattr(self, "dt_proj" + suffix).bias._no_reinit = True
            getattr(self, "A_log" + suffix)._no_weight_decay = True
            getattr(self, "D" + suffix)._no_weight_decay = True
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=bias)
        if initialize:
            self.reset_ssm_parameters()

    def ssm_parameter_values(self, suffix: str) -> dict:
        """mamba_simple's initialisation: dt_proj's weight at scale dt_rank**-0.5 * dt_scale, its bias the
        inverse softplus of a log-uniform dt, A = -(1, ..., d_state) for every channel (S4D-real), D = 1."""
        device = self.get_parameter("A_log" + suffix).device
        device = None if device.type == "meta" else device
        dt_std = self.dt_rank**-0.5 * self.dt_scale
        weight = torch.empty(self.d_inner, self.dt_rank, device=device)
        weight = weight.fill_(dt_std) if self.dt_init == "constant" else weight.uniform_(-dt_std, dt_std)
        A = torch.arange(1, self.d_state + 1, dtype=torch.float32, device=device)
        return {
            f"dt_proj{suffix}.weight": weight,
            f"dt_proj{suffix}.bias": inverse_softplus_dt(
                self.d_inner, self.dt_min, self.dt_max, self.dt_init_floor, device
            ),
            "A_log" + suffix: torch.log(A).expand(self.d_inner, -1).contiguous(),
            "D" + suffix: torch.ones(self.d_inner, device=device),
        }

    # ---- the Mamba-1 math inside the skeleton ------------------------------------------------

    def _project(self, u):
        """(b, l, d_model) -> conv input x (b, l, d_inner), gate z (b, l, d_inner); dt comes after the conv."""
        x, z = self.in_proj(u).chunk(2, dim=-1)
        return x, z, None

    def _scan_route(self, history, dt_raw, suffix, initial_state=None, mask=None):
        """history: (b, d_conv + l, d_inner) from `conv_history`, in the route's order (dt_raw is computed
        here, from the conv output) -> y (b, l, d_inner) with the D skip, not gated, and the final SSM state
        (b, d_inner, d_state) fp32."""
        conv, x_proj, dt_proj, A_log, D = self.route_parameters(suffix, "conv1d", "x_proj", "dt_proj", "A_log", "D")
        fast = get_kernels(history)
        conv_silu = fast.causal_conv_silu if fast is not None and fast.causal_conv_silu else causal_conv_silu
        xc = conv_silu(history, conv)  # (b, l, d_inner)
        dt_low, B, C = torch.split(x_proj(xc), [self.dt_rank, self.d_state, self.d_state], dim=-1)
        dt_weight, dt_bias = linear_weight_and_bias(dt_proj)
        dt_raw = F.linear(dt_low, dt_weight)  # (b, l, d_inner), bias added with the softplus
        A = -torch.exp(A_log.float())
        if fast is not None and fast.selective_scan is not None:
            result = fast.selective_scan(xc, dt_raw, dt_bias, A, B, C, D, initial_state, mask)
            if result is not None:
                return result
        dt = F.softplus(dt_raw.float() + dt_bias.float())
        if mask is not None:
            dt = dt * mask[:, :, None].to(dt.dtype)
        return selective_scan(xc, dt, A, B, C, D=D, initial_state=initial_state, chunk_size=self.chunk_size)

    def _gated(self, y, z):
        """y * silu(z), in fp32 (as the kernels' fused gate)."""
        return y.float() * F.silu(z.float())

    def _step(self, u, conv_state, ssm_state):
        """One token: u (b, 1, d_model) -> (b, 1, d_model); both states advance in place."""
        x, z, _ = self._project(u[:, 0])  # (b, d_inner) each
        fast = get_kernels(u)
        conv_step = fast.causal_conv_step if fast is not None and fast.causal_conv_step else causal_conv_step
        x = conv_step(conv_state, x, self.conv1d).to(u.dtype)
        dt_low, B, C = torch.split(self.x_proj(x), [self.dt_rank, self.d_state, self.d_state], dim=-1)
        dt_weight, dt_bias = linear_weight_and_bias(self.dt_proj)
        dt_raw = F.linear(dt_low, dt_weight)
        A = -torch.exp(self.A_log.float())
        if fast is not None and fast.selective_step is not None:
            y = fast.selective_step(ssm_state, x, dt_raw, dt_bias, A, B, C, self.D)
        else:
            y = selective_step(ssm_state, x, F.softplus(dt_raw.float() + dt_bias.float()), A, B, C, self.D)
        return self.out_proj(self._gated(y, z).to(u.dtype))[:, None]
