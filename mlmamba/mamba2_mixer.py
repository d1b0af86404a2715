"""The Mamba-2 (SSD) mixer, one implementation for the language model and the scan connectors.

Parameter names follow state-spaces/mamba `mamba_ssm/modules/mamba2.py` so that released
checkpoints load by renaming prefixes only:

    in_proj   Linear(d_model -> [z: d_inner | xBC: d_inner + 2*ngroups*d_state | dt: nheads])
    conv1d    depthwise causal Conv1d over xBC (kernel d_conv), followed by SiLU
    dt_bias, A_log, D   one scalar per head
    norm      gated RMSNorm: rmsnorm(y * silu(z)) per group (norm_before_gate=False)
    out_proj  Linear(d_inner -> d_model)

Non-causal scans (`scan=`, see `ssm_ops.SCAN_ROUTES`):
  * "bidirectional" (ML-Mamba's MSC, released as "Bidirectional_Mamba"; BSM in VL-Mamba) adds
    `conv1d_b`, `dt_bias_b`, `A_log_b`, `D_b` for a second scan over the reversed sequence and
    returns `out_proj((norm(y_fwd, z) + flip(norm(y_bwd, flip(z)))) / 2)`: in_proj, norm and
    out_proj are shared; each direction is gated and normalised before the average (as in the
    released fork's `Mamba2` with `bimamba_type="v2"`).
  * "cross" (CSM in VL-Mamba, VMamba's SS2D routes) scans an h x w patch grid whose tokens arrive
    row-major along four routes: rows forward, rows backward, columns forward, columns backward,
    with parameters suffixed "", "_b", "_c", "_c_b". Same rule: each route's output is put back in
    row-major order, gated and normalised, and the routes are averaged before out_proj.

Shapes: b = batch, l = sequence, h = nheads, p = headdim, g = ngroups, j = h // g heads per group,
n = d_state, c = number of chunks, q = chunk length, s/t = positions inside a chunk.

Two scan algorithms, equal up to float rounding:
  * `ssd_chunk_scan`: the chunked SSD algorithm for whole sequences (prefill, training).
    Per chunk it builds (q x q) mixing matrices, never (l x l), and it never repeats B or C over
    heads, so memory is O(l * h * q) + O(l / q * h * p * n).
  * `ssd_step`: the recurrence for one new token (decoding), O(h * p * n).
On CUDA, mamba_ssm's Triton kernels stand in for both where they import (see `kernels.py`).
"""

import torch
import torch.nn.functional as F
from torch import nn

from .kernels import NO_DT_LIMIT, get_kernels
from .ssm_ops import (
    EXP_FLOOR,
    RMSNormGated,
    ScanMixer,
    causal_conv_silu,
    causal_conv_step,
    check_scan,
    inverse_softplus_dt,
)

# The torch scan's chunk length when the config's is longer: the result does not depend on it (up to
# rounding), the (q x q) work does; 64 was the fastest on CPUs (see docs/PERFORMANCE.md).
TORCH_CHUNK_SIZE = 64


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
    return y.reshape(b, c * q, h, p)[:, :l].to(dtype), final_state


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
    if torch.compiler.is_compiling():
        # Written as broadcasts, so that inductor makes the decay, the outer product with B, the product
        # with C and the write-back one loop over the state (bmm and baddbmm stay separate passes).
        new_state = state.float().view(b, g, j, p, n) * dA.view(b, g, j, 1, 1) + dtx.view(
            b, g, j, p, 1
        ) * B.float().view(b, g, 1, 1, n)
        state.copy_(new_state.view(b, h, p, n))
        y = (new_state * C.float().view(b, g, 1, 1, n)).sum(-1).view(b, h, p)
        if D is not None:
            y = y + x32 * D.float()[:, None]
        return y.to(x.dtype)
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


class Mamba2Mixer(ScanMixer):
    """Mamba-2 SSD mixer. Input and output: (b, l, d_model); routes and states as in `ScanMixer`.

    States: conv_state (b, conv_dim, d_conv), ssm_state (b, nheads, headdim, d_state).
    `initialize=False` leaves the SSM parameters to the caller (`MLMambaPreTrainedModel._init_weights`).
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
        dt_limit: tuple[float, float] = NO_DT_LIMIT,
        scan: str = "causal",
        initialize: bool = True,
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
        if initialize:
            self.reset_ssm_parameters()

    def ssm_parameter_values(self, suffix: str) -> dict:
        """mamba_ssm's initialisation: dt_bias the inverse softplus of a log-uniform dt, A = -U(A_init_range),
        D = 1."""
        device = self.get_parameter("dt_bias" + suffix).device
        device = None if device.type == "meta" else device
        return {
            "dt_bias" + suffix: inverse_softplus_dt(self.nheads, self.dt_min, self.dt_max, self.dt_init_floor, device),
            "A_log" + suffix: torch.log(torch.empty(self.nheads, device=device).uniform_(*self.A_init_range)),
            "D" + suffix: torch.ones(self.nheads, device=device),
        }

    # ---- the Mamba-2 math inside the skeleton ------------------------------------------------

    def _project(self, u):
        """(b, l, d_model) -> conv input xBC (b, l, conv_dim), gate z (b, l, d_inner), dt_raw (b, l, nheads)."""
        z, xBC, dt_raw = torch.split(self.in_proj(u), [self.d_inner, self.conv_dim, self.nheads], dim=-1)
        return xBC, z, dt_raw

    def _dt(self, dt_raw: torch.Tensor, dt_bias: torch.Tensor) -> torch.Tensor:
        """Step sizes softplus(dt_raw + dt_bias), clamped to `dt_limit`, in fp32."""
        dt = F.softplus(dt_raw.float() + dt_bias.float())
        if self.dt_limit != NO_DT_LIMIT:
            dt = dt.clamp(*self.dt_limit)
        return dt

    def _split_xBC(self, xBC: torch.Tensor):
        """(..., conv_dim) -> x (..., nheads, headdim), B and C (..., ngroups, d_state)."""
        gn = self.ngroups * self.d_state
        x, B, C = torch.split(xBC, [self.d_inner, gn, gn], dim=-1)
        lead = xBC.shape[:-1]
        return (
            x.reshape(*lead, self.nheads, self.headdim),
            B.reshape(*lead, self.ngroups, self.d_state),
            C.reshape(*lead, self.ngroups, self.d_state),
        )

    def _scan_route(self, history, dt_raw, suffix, initial_state=None, mask=None):
        """history (b, d_conv + l, conv_dim) from `conv_history`, dt_raw (b, l, nheads) in the route's order
        -> y (b, l, d_inner) with the D skip, not gated, and the final state (b, nheads, headdim, d_state) fp32."""
        conv, dt_bias, A_log, D = self.route_parameters(suffix, "conv1d", "dt_bias", "A_log", "D")
        x, B, C = self._split_xBC(causal_conv_silu(history, conv))
        dt = self._dt(dt_raw, dt_bias)
        if mask is not None:
            dt = dt * mask[:, :, None].to(dt.dtype)
        A = -torch.exp(A_log.float())
        fast = get_kernels(x)
        if fast is not None and fast.ssd_chunk_scan is not None:
            y, state = fast.ssd_chunk_scan(x, dt, A, B, C, self.chunk_size, D=D, initial_state=initial_state)
        else:
            chunk = min(self.chunk_size, TORCH_CHUNK_SIZE)
            y, state = ssd_chunk_scan(x, dt, A, B, C, chunk, D=D, initial_state=initial_state)
        return y.flatten(-2), state

    def _gated(self, y, z):
        return self.norm(y, z)

    def _step(self, u, conv_state, ssm_state):
        """One token: u (b, 1, d_model) -> (b, 1, d_model); both states advance in place."""
        xBC, z, dt_raw = self._project(u[:, 0])
        fast = get_kernels(u)
        conv_step = fast.causal_conv_step if fast is not None and fast.causal_conv_step else causal_conv_step
        x, B, C = self._split_xBC(conv_step(conv_state, xBC, self.conv1d))
        A = -torch.exp(self.A_log.float())
        if fast is not None and fast.ssd_step is not None:
            y = fast.ssd_step(ssm_state, x, dt_raw, self.dt_bias, self.dt_limit, A, B, C, self.D)
        else:
            y = ssd_step(ssm_state, x, self._dt(dt_raw, self.dt_bias), A, B, C, self.D)
        y = self.norm(y.flatten(-2), z)
        return self.out_proj(y.to(u.dtype))[:, None]
