"""What the Mamba-2 and Mamba-1 mixers share: norms, the causal depthwise conv and its state, padding
alignment, scan routes, and the mixer skeleton (`ScanMixer`) that each mixer fills with its own math.

Shapes: b = batch, l = sequence, d = channels, k = d_conv (the conv kernel length).

Padding: the rows of a batch hold their tokens in one contiguous block (left or right padding). Such
rows are moved so that every row starts at position 0 (`left_align_index`); the scan then sees the
same inputs as the row run alone, pads get dt = 0 (no decay, no input), and the conv state is read at
each row's last real token. The outputs are moved back afterwards (`restore_order`).

Scan routes: tokens arrive in row-major order of an h x w grid (or as a flat sequence, h = 1). A route
is the order in which one scan visits them; non-causal mixers have one set of conv, dt and SSM
parameters per route, named with the route's suffix.

This module imports torch only (tests run the mixers without transformers).
"""

import math

import torch
import torch.nn.functional as F
from torch import nn

# exp() arguments of the scans' decays are raised to this floor: exp(-60) ~ 1e-26 is nothing next to fp32
# rounding, and it keeps exp() and the products after it off denormal numbers, which are many times
# slower on CPUs (see docs/PERFORMANCE.md).
EXP_FLOOR = -60.0


# --------------------------------------------------------------------------------------
# Norms. Without autograd (inference) they work in place on their own temporaries: every large
# temporary a CPU allocates is fresh memory to map.
# --------------------------------------------------------------------------------------


def _rms_scale(x: torch.Tensor, eps: float) -> torch.Tensor:
    """1 / rms(x) over the last dimension, (..., 1), from one reduction pass (no x**2 temporary)."""
    return torch.rsqrt(torch.linalg.vector_norm(x, dim=-1, keepdim=True).square() / x.shape[-1] + eps)


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


# --------------------------------------------------------------------------------------
# Causal depthwise conv, token-major: (b, l, d) in and out, as in_proj lays them out. The "history"
# of a call is [the k inputs before it; its inputs]: (b, k + l, d). The conv reads it, and the next
# conv state is a slice of it.
# --------------------------------------------------------------------------------------


def conv_history(x: torch.Tensor, conv_state: torch.Tensor | None, d_conv: int) -> torch.Tensor:
    """x: (b, l, d); conv_state: (b, d, k), the last k inputs before x, or None (zeros).
    Returns (b, k + l, d), token-major."""
    if conv_state is None:
        return F.pad(x, (0, 0, d_conv, 0))
    return torch.cat([conv_state.transpose(1, 2).to(x.dtype), x], dim=1)


def causal_conv_silu(history: torch.Tensor, conv: nn.Conv1d) -> torch.Tensor:
    """SiLU of the depthwise causal conv of the inputs in `history` (b, k + l, d) -> (b, l, d).

    Runs as a conv2d over a (b, d, 1, time) channels-last view of the token-major tensor, so no transposed
    copy is made on the way in or out, and the scan gets token-major rows.
    """
    x = history[:, 1:].transpose(1, 2).unsqueeze(2)  # (b, d, 1, k - 1 + l), channels-last strides
    out = F.conv2d(x, conv.weight.unsqueeze(2), conv.bias, groups=x.shape[1])  # (b, d, 1, l)
    return F.silu(out.squeeze(2).transpose(1, 2), inplace=not torch.is_grad_enabled())


def update_conv_state(conv_state: torch.Tensor, history: torch.Tensor, lengths: torch.Tensor | None = None) -> None:
    """conv_state (b, d, k) <- the last k inputs up to each row's last token, in place.

    history: (b, k + l, d) from `conv_history`; lengths: (b,) tokens per row (at the front of the row),
    or None for all l. A row of length 0 keeps its state."""
    d_conv = conv_state.shape[-1]
    if lengths is None:
        conv_state.copy_(history[:, -d_conv:].transpose(1, 2))
        return
    rows = lengths[:, None] + torch.arange(d_conv, device=history.device)[None]  # (b, k)
    conv_state.copy_(history.gather(1, rows[:, :, None].expand(-1, -1, history.shape[2])).transpose(1, 2))


def causal_conv_step(conv_state: torch.Tensor, x: torch.Tensor, conv: nn.Conv1d) -> torch.Tensor:
    """One new input per row, x (b, d): conv_state (b, d, k) shifts it in (in place) and the SiLU of the
    conv at that position is returned, (b, d) in the conv state's dtype."""
    conv_state.copy_(torch.cat([conv_state[:, :, 1:], x[:, :, None].to(conv_state.dtype)], dim=-1))
    out = torch.linalg.vecdot(conv_state, conv.weight[:, 0].to(conv_state.dtype))
    if conv.bias is not None:
        out = out + conv.bias
    return F.silu(out)


# --------------------------------------------------------------------------------------
# Padding alignment
# --------------------------------------------------------------------------------------


def check_contiguous(mask: torch.Tensor) -> None:
    m = mask.to(torch.int8)
    rises = (m[:, 1:] > m[:, :-1]).sum(1) + (m[:, 0] > 0)
    if torch.compiler.is_compiling():  # a runtime check: a data-dependent branch would break the graph
        torch._check_tensor_all(rises <= 1)
        return
    if bool((rises > 1).any()):
        raise ValueError(
            "attention_mask must mark one contiguous block of tokens per row (left or right padding); "
            "got a row with a gap inside it. Pack or split such sequences before calling the model."
        )


def left_align_index(mask: torch.Tensor) -> torch.Tensor:
    """mask: (b, l) of 0/1 with one contiguous block of ones per row -> (b, l) gather index that moves each
    row's block to the front (pads behind it)."""
    l = mask.shape[1]
    start = torch.argmax(mask.to(torch.int32), dim=1, keepdim=True)  # first real token (0 for an all-pad row)
    return (torch.arange(l, device=mask.device)[None] + start) % l


def restore_order(t: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Undo `t.gather(1, index)` for (b, l, d) tensors: put each row's positions back where they were."""
    return t.gather(1, torch.argsort(index, dim=1)[:, :, None].expand_as(t))


# --------------------------------------------------------------------------------------
# Scan routes
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
        raise ValueError(f"the cross scan needs the patch grid: {l} tokens are not a square grid; pass grid=(h, w)")
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

    def _apply(self, t: torch.Tensor, index: torch.Tensor | None) -> torch.Tensor:
        if self.route == "forward":
            return t
        if self.route == "backward":
            return t.flip(1)
        return t.index_select(1, index)

    def to_route(self, t: torch.Tensor) -> torch.Tensor:
        return self._apply(t, self.order)

    def to_rows(self, t: torch.Tensor) -> torch.Tensor:
        return self._apply(t, self.inverse)


# --------------------------------------------------------------------------------------
# Initialisation and the mixer skeleton
# --------------------------------------------------------------------------------------


def inverse_softplus_dt(n: int, dt_min: float, dt_max: float, dt_init_floor: float, device=None) -> torch.Tensor:
    """mamba_ssm's dt bias: the inverse softplus of n step sizes drawn log-uniform in [dt_min, dt_max], floored."""
    log_dt = torch.rand(n, device=device) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)
    dt = torch.exp(log_dt).clamp(min=dt_init_floor)
    return dt + torch.log(-torch.expm1(-dt))


def linear_weight_and_bias(linear: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A Linear's weight and bias as tensors, also for a dynamically quantized Linear (where they are methods)."""
    if isinstance(linear.weight, torch.Tensor):
        return linear.weight, linear.bias
    return linear.weight().dequantize(), linear.bias()


def _copy(param: torch.Tensor, value: torch.Tensor) -> None:
    param.copy_(value)


class ScanMixer(nn.Module):
    """The skeleton both mixers share: argument checks, padding alignment, the route loop, and the one
    initialisation path of their SSM parameters. Input and output: (b, l, d_model).

    `scan="causal"`: causal scan with an optional decode state (language model).
    `scan="bidirectional"`: forward scan plus a scan over the reversed sequence (MSC, VL-Mamba's BSM).
    `scan="cross"`: four routes over an h x w patch grid, rows and columns, each both ways (CSM).
    Non-causal scans have one set of route parameters per route, named with the route's suffix
    (`route_suffixes`); the input and output projections are shared.

    A mixer defines its own math in:
        _project(u) -> (conv_input (b, l, d_conv_channels), gate, dt_raw or None)
        _scan_route(history, dt_raw, suffix, initial_state, mask) -> y (b, l, d_inner), final SSM state
        _gated(y, gate) -> the gated (and for Mamba-2 normalised) output of one route, before out_proj
        _step(u, conv_state, ssm_state) -> (b, 1, d_model), one decoding token
        ssm_parameter_values(suffix) -> {parameter name: fresh value}, mamba_ssm's initialisation
    """

    scan: str
    d_conv: int

    @property
    def routes(self) -> tuple[str, ...]:
        """The routes this mixer scans (`SCAN_ROUTES[self.scan]`)."""
        return SCAN_ROUTES[self.scan]

    @property
    def route_suffixes(self) -> tuple[str, ...]:
        """Parameter-name suffix of each route: ("",), ("", "_b") or ("", "_b", "_c", "_c_b")."""
        return tuple(ROUTE_SUFFIXES[route] for route in self.routes)

    @torch.no_grad()
    def reset_ssm_parameters(self, copy=_copy) -> None:
        """mamba_ssm's initialisation of every route's SSM parameters, written with `copy(param, value)`
        (`MLMambaPreTrainedModel._init_weights` passes transformers' `init.copy_`, which leaves loaded
        weights alone). Parameters on the meta device are skipped."""
        for suffix in self.route_suffixes:
            for name, value in self.ssm_parameter_values(suffix).items():
                param = self.get_parameter(name)
                if param.device.type != "meta":
                    copy(param, value.to(param.device, param.dtype))

    def route_parameters(self, suffix: str, *names: str):
        return tuple(getattr(self, name + suffix) for name in names)

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
            attention_mask: (b, l) with 1 for tokens and 0 for padding, one contiguous block of tokens per
                row (left or right padding). Padding never changes the states, so each row equals the row
                run alone.
            conv_state: (b, conv channels, d_conv), the last d_conv inputs of the conv; read and updated in
                place. ssm_state: the SSM state (see the mixer); read and updated in place. Give both states
                or neither. With states, `l == 1` takes the recurrent step and `l > 1` continues the scan.
            grid: (h, w) of the patch grid whose tokens arrive row-major (h * w == l). Needed by
                `scan="cross"` unless l is a perfect square (then a square grid is taken); the other scans
                only check it.

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
        index = None
        # Compiled, a mask is always applied (no data-dependent branch): aligning an all-ones mask changes nothing.
        if attention_mask is not None and (torch.compiler.is_compiling() or not bool(attention_mask.all())):
            check_contiguous(attention_mask)
            index = left_align_index(attention_mask)
            u = u.gather(1, index[:, :, None].expand_as(u))
            attention_mask = attention_mask.gather(1, index)
        else:
            attention_mask = None

        conv_input, gate, dt_raw = self._project(u)
        if attention_mask is not None:
            # Tokens sit at the front of every row now: pads at the end must not enter the conv state.
            conv_input = conv_input * attention_mask[:, :, None].to(conv_input.dtype)
        history = conv_history(conv_input, conv_state, self.d_conv)
        y, final_state = self._scan_route(history, dt_raw, "", ssm_state, attention_mask)
        if conv_state is not None:
            update_conv_state(conv_state, history, attention_mask.sum(1) if attention_mask is not None else None)
            ssm_state.copy_(final_state)

        out = self.out_proj(self._gated(y, gate).to(u.dtype))
        return restore_order(out, index) if index is not None else out

    def _forward_routes(self, u, attention_mask, grid):
        if attention_mask is not None and not bool(attention_mask.all()):
            raise ValueError(f"the {self.scan} scan takes full image grids; attention_mask is not supported")
        h, w = resolve_grid(self.scan, u.shape[1], grid)
        conv_input, gate, dt_raw = self._project(u)
        y = None
        for route, suffix in zip(self.routes, self.route_suffixes):
            perm = RoutePermutation(route, h, w, u.device)
            history = conv_history(perm.to_route(conv_input), None, self.d_conv)
            y_r, _ = self._scan_route(history, perm.to_route(dt_raw) if dt_raw is not None else None, suffix)
            # As released: each route is gated (and normalised) on its own, in row-major order; the routes
            # are averaged.
            y_r = self._gated(perm.to_rows(y_r), gate)
            y = y_r if y is None else y + y_r
        return self.out_proj((y / len(self.routes)).to(u.dtype))
