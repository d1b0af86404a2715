"""The Mamba-1 mixer against independent references: the per-token recurrence (and the SSM written
out by hand), transformers' MambaMixer holding the same weights, hand-written bidirectional and
cross scans; chunk-size independence and gradients; cached continuation; padding."""

import math

import pytest
import torch
import torch.nn.functional as F

from mlmamba.mamba1_mixer import (
    Mamba1Mixer,
    get_mamba1_kernels,
    selective_scan,
    selective_scan_naive,
    selective_step,
)


def _inputs(b=2, l=37, d=12, n=8, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(b, l, d, generator=gen)
    dt = torch.rand(b, l, d, generator=gen) * 0.5
    A = -torch.rand(d, n, generator=gen) * 4 - 0.1
    B = torch.randn(b, l, n, generator=gen)
    C = torch.randn(b, l, n, generator=gen)
    D = torch.randn(d, generator=gen)
    s0 = torch.randn(b, d, n, generator=gen)
    return x, dt, A, B, C, D, s0


# ---- the scan ---------------------------------------------------------------------------------


@pytest.mark.parametrize("chunk_size", [1, 3, 8, 37, 64, None])
def test_chunked_scan_equals_recurrence_for_any_chunk_size(chunk_size):
    x, dt, A, B, C, D, s0 = _inputs()
    y_ref, state_ref = selective_scan_naive(x, dt, A, B, C, D, initial_state=s0)
    s0_copy = s0.clone()
    y, state = selective_scan(x, dt, A, B, C, D=D, initial_state=s0, chunk_size=chunk_size)
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(state, state_ref, atol=1e-5, rtol=1e-5)
    assert torch.equal(s0, s0_copy)  # the initial state is not modified
    with torch.no_grad():  # the in-place inference path
        y2, state2 = selective_scan(x, dt, A, B, C, D=D, initial_state=s0, chunk_size=chunk_size)
    torch.testing.assert_close(y2, y_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(state2, state_ref, atol=1e-5, rtol=1e-5)
    assert torch.equal(s0, s0_copy)


def test_recurrence_matches_definition():
    """selective_scan_naive against the SSM written out with explicit loops over channels and states."""
    x, dt, A, B, C, D, _ = _inputs(b=1, l=6, d=3, n=4)
    y, _ = selective_scan_naive(x, dt, A, B, C, D)
    h = torch.zeros(3, 4)
    for t in range(6):
        for c in range(3):
            for s in range(4):
                h[c, s] = math.exp(dt[0, t, c] * A[c, s]) * h[c, s] + dt[0, t, c] * B[0, t, s] * x[0, t, c]
            expected = sum(C[0, t, s] * h[c, s] for s in range(4)) + D[c] * x[0, t, c]
            torch.testing.assert_close(y[0, t, c], expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("chunk_size", [4, 7, 19])
def test_chunked_scan_gradients_equal_recurrence_gradients(chunk_size):
    """Training differentiates the chunked scan: its gradients must match the recurrence's."""
    inputs = [t.double().requires_grad_() for t in _inputs(b=1, l=19, d=4, n=5)]
    x, dt, A, B, C, D, s0 = inputs
    y, state = selective_scan(x, dt, A, B, C, D=D, initial_state=s0, chunk_size=chunk_size)
    grads = torch.autograd.grad((y * y.detach().sin()).sum() + state.sum(), inputs)
    y_ref, state_ref = selective_scan_naive(x, dt, A, B, C, D, initial_state=s0)
    grads_ref = torch.autograd.grad((y_ref * y_ref.detach().sin()).sum() + state_ref.sum(), inputs)
    for g, g_ref in zip(grads, grads_ref):
        torch.testing.assert_close(g.double(), g_ref.double(), atol=1e-4, rtol=1e-4)


def test_step_equals_scan_and_zero_dt_leaves_the_state_unchanged():
    x, dt, A, B, C, D, s0 = _inputs(b=2, l=9)
    dt[:, 4:6] = 0.0  # what pads get: exp(0 * A) = 1 (no decay) and 0 * x * B (no input)
    y_ref, state_ref = selective_scan_naive(x, dt, A, B, C, D, initial_state=s0)
    state = s0.clone()
    ys = []
    for t in range(9):
        before = state.clone()
        ys.append(selective_step(state, x[:, t], dt[:, t], A, B[:, t], C[:, t], D))
        if t in (4, 5):
            assert torch.equal(state, before)
    torch.testing.assert_close(torch.stack(ys, 1), y_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(state, state_ref, atol=1e-5, rtol=1e-5)
    # trailing zero steps: the final state is the state after the last real token
    _, s_real = selective_scan(x[:, :4], dt[:, :4], A, B[:, :4], C[:, :4], D, initial_state=s0, chunk_size=3)
    _, s_padded = selective_scan(x[:, :6], dt[:, :6], A, B[:, :6], C[:, :6], D, initial_state=s0, chunk_size=3)
    torch.testing.assert_close(s_padded, s_real, atol=1e-6, rtol=1e-6)


# ---- the mixer ---------------------------------------------------------------------------------


def _mixer(**kw):
    torch.manual_seed(0)
    m = Mamba1Mixer(32, d_state=8, **kw).eval()
    _redraw(m)
    return m


@torch.no_grad()
def _redraw(m):
    """Weights at unit scale (the default init makes most outputs tiny), every route different."""
    gen = torch.Generator().manual_seed(1)
    for name, p in m.named_parameters():
        if name.startswith("A_log"):
            p.copy_(torch.log(torch.rand(p.shape, generator=gen) * 3 + 0.5))
        elif name.startswith("dt_proj") and name.endswith("bias"):
            p.copy_(torch.log(torch.expm1(torch.rand(p.shape, generator=gen) * 0.4 + 0.05)))
        elif name.startswith("conv1d") and name.endswith("weight"):
            p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
        elif p.ndim == 2:  # Linear weights
            p.copy_(torch.randn(p.shape, generator=gen) / math.sqrt(p.shape[1]))
        else:  # conv biases, D
            p.copy_(torch.randn(p.shape, generator=gen))


def _states(m, b):
    return torch.zeros(b, m.d_inner, m.d_conv), torch.zeros(b, m.d_inner, m.d_state)


def test_parameter_names_shapes_and_init():
    torch.manual_seed(0)
    m = Mamba1Mixer(40, d_state=16)  # dt_rank "auto" = ceil(40 / 16) = 3
    shapes = {k: tuple(v.shape) for k, v in m.state_dict().items()}
    assert shapes == {
        "in_proj.weight": (160, 40),
        "conv1d.weight": (80, 1, 4),
        "conv1d.bias": (80,),
        "x_proj.weight": (3 + 32, 80),
        "dt_proj.weight": (80, 3),
        "dt_proj.bias": (80,),
        "A_log": (80, 16),
        "D": (80,),
        "out_proj.weight": (40, 80),
    }
    assert torch.equal(m.A_log, torch.log(torch.arange(1, 17.0)).expand(80, 16))
    assert torch.equal(m.D, torch.ones(80))
    dt = F.softplus(m.dt_proj.bias)
    assert bool(((dt > 0.001 * 0.999) & (dt < 0.1 * 1.001)).all())
    assert m.dt_proj.weight.abs().max() <= 3**-0.5
    bi = Mamba1Mixer(40, scan="bidirectional")
    extra = {k for k in bi.state_dict()} - set(shapes)
    assert extra == {
        "conv1d_b.weight", "conv1d_b.bias", "x_proj_b.weight", "dt_proj_b.weight", "dt_proj_b.bias", "A_log_b", "D_b"
    }  # fmt: skip
    cross = Mamba1Mixer(40, scan="cross")
    assert cross.route_suffixes == ("", "_b", "_c", "_c_b")
    for suffix in cross.route_suffixes:  # every route initialised
        assert torch.equal(getattr(cross, "A_log" + suffix), torch.log(torch.arange(1, 17.0)).expand(80, 16))
        dt = F.softplus(getattr(cross, "dt_proj" + suffix).bias)
        assert bool(((dt > 0.001 * 0.999) & (dt < 0.1 * 1.001)).all())
    assert not torch.equal(cross.dt_proj.bias, cross.dt_proj_c.bias)


@torch.no_grad()
def test_causal_mixer_equals_transformers_mamba_mixer():
    from transformers import MambaConfig
    from transformers.models.mamba.modeling_mamba import MambaMixer

    m = _mixer()
    config = MambaConfig(
        hidden_size=32, state_size=8, conv_kernel=4, expand=2, time_step_rank="auto",
        use_bias=False, use_conv_bias=True, num_hidden_layers=1, hidden_act="silu",
    )  # fmt: skip
    ref = MambaMixer(config, layer_idx=0).eval()  # eval: its slow torch path (no kernels here)
    ref.load_state_dict(m.state_dict())
    u = torch.randn(2, 23, 32)
    expected = ref(u)
    assert expected.abs().mean() > 0.05  # a meaningful comparison, not of two tiny outputs
    torch.testing.assert_close(m(u), expected, atol=1e-5, rtol=1e-5)


@torch.no_grad()
@pytest.mark.parametrize("chunk_size", [None, 4])
def test_cached_continuation_equals_full_forward(chunk_size):
    m = _mixer(chunk_size=chunk_size)
    u = torch.randn(2, 21, 32)
    full = m(u)
    conv, ssm = _states(m, 2)
    parts = [m(u[:, :9], conv_state=conv, ssm_state=ssm), m(u[:, 9:14], conv_state=conv, ssm_state=ssm)]
    parts += [m(u[:, t : t + 1], conv_state=conv, ssm_state=ssm) for t in range(14, 21)]
    torch.testing.assert_close(torch.cat(parts, 1), full, atol=1e-5, rtol=1e-5)
    # the states after the pieces are the states after the whole sequence at once
    conv_full, ssm_full = _states(m, 2)
    m(u, conv_state=conv_full, ssm_state=ssm_full)
    torch.testing.assert_close(conv, conv_full, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(ssm, ssm_full, atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_continuing_a_prefill_from_states_equals_full_forward():
    m = _mixer()
    u = torch.randn(2, 30, 32)
    full = m(u)
    conv, ssm = _states(m, 2)
    m(u[:, :17], conv_state=conv, ssm_state=ssm)
    assert ssm.abs().max() > 0.1
    torch.testing.assert_close(m(u[:, 17:], conv_state=conv, ssm_state=ssm), full[:, 17:], atol=1e-5, rtol=1e-5)
    # a continuation shorter than the conv kernel
    conv, ssm = _states(m, 2)
    m(u[:, :28], conv_state=conv, ssm_state=ssm)
    torch.testing.assert_close(m(u[:, 28:], conv_state=conv, ssm_state=ssm), full[:, 28:], atol=1e-5, rtol=1e-5)


@torch.no_grad()
@pytest.mark.parametrize("side", ["left", "right"])
def test_padding_never_touches_the_states(side):
    m = _mixer()
    u = torch.randn(3, 15, 32)
    lengths = [15, 9, 2]
    mask = torch.zeros(3, 15, dtype=torch.long)
    for i, n in enumerate(lengths):
        if side == "left":
            mask[i, 15 - n :] = 1
        else:
            mask[i, :n] = 1
    conv, ssm = _states(m, 3)
    prefix = torch.randn(3, 5, 32)  # start from non-zero states
    m(prefix, conv_state=conv, ssm_state=ssm)
    conv_rows, ssm_rows = conv.clone(), ssm.clone()
    out = m(u, attention_mask=mask, conv_state=conv, ssm_state=ssm)
    no_state = m(u, attention_mask=mask)
    for i, n in enumerate(lengths):
        sl = slice(15 - n, 15) if side == "left" else slice(0, n)
        c1, s1 = conv_rows[i : i + 1].clone(), ssm_rows[i : i + 1].clone()
        alone = m(u[i : i + 1, sl], conv_state=c1, ssm_state=s1)
        torch.testing.assert_close(out[i, sl], alone[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(conv[i], c1[0], atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(ssm[i], s1[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(no_state[i, sl], m(u[i : i + 1, sl])[0], atol=1e-5, rtol=1e-5)
    # the next token continues every row as if it had been run alone
    nxt = torch.randn(3, 1, 32)
    step = m(nxt, conv_state=conv, ssm_state=ssm)
    for i, n in enumerate(lengths):
        sl = slice(15 - n, 15) if side == "left" else slice(0, n)
        c1, s1 = conv_rows[i : i + 1].clone(), ssm_rows[i : i + 1].clone()
        alone = m(torch.cat([u[i : i + 1, sl], nxt[i : i + 1]], 1), conv_state=c1, ssm_state=s1)
        torch.testing.assert_close(step[i, 0], alone[0, -1], atol=1e-5, rtol=1e-5)


def test_mask_with_a_gap_and_half_a_state_are_refused():
    m = _mixer()
    with pytest.raises(ValueError, match="contiguous"):
        m(torch.randn(1, 4, 32), attention_mask=torch.tensor([[1, 1, 0, 1]]))
    conv, _ = _states(m, 1)
    with pytest.raises(ValueError, match="both"):
        m(torch.randn(1, 4, 32), conv_state=conv)
    bi = _mixer(scan="bidirectional")
    with pytest.raises(ValueError, match="no decode state"):
        bi(torch.randn(1, 4, 32), *_states(bi, 1))


def test_no_kernels_on_cpu():
    assert get_mamba1_kernels(torch.zeros(1)) is None


# ---- non-causal scans: hand-written references ----------------------------------------------------


def _reference_route(m, x, suffix):
    """One route written out by hand: x (b, l, d_inner) in the route's order -> y (b, l, d_inner), ungated.
    Causal depthwise conv as a loop, SiLU, x_proj, dt_proj + softplus, the per-token recurrence."""
    conv, x_proj, dt_proj, A_log, D = (getattr(m, n + suffix) for n in ("conv1d", "x_proj", "dt_proj", "A_log", "D"))
    b, l, d = x.shape
    w = conv.weight[:, 0]  # (d, k)
    k = w.shape[1]
    padded = F.pad(x, (0, 0, k - 1, 0))
    xc = torch.stack([(padded[:, t : t + k] * w.T).sum(1) + conv.bias for t in range(l)], dim=1)
    xc = xc * torch.sigmoid(xc)
    dt_low, B, C = torch.split(xc @ x_proj.weight.T, [m.dt_rank, m.d_state, m.d_state], dim=-1)
    dt = F.softplus(dt_low @ dt_proj.weight.T + dt_proj.bias)
    y, _ = selective_scan_naive(xc, dt, -torch.exp(A_log), B, C, D)
    return y


@torch.no_grad()
def test_bidirectional_scan_equals_two_direction_reference():
    m = _mixer(scan="bidirectional")
    u = torch.randn(2, 19, 32)
    x, z = m.in_proj(u).chunk(2, dim=-1)
    y_f = _reference_route(m, x, "")
    y_b = _reference_route(m, x.flip(1), "_b").flip(1)
    expected = m.out_proj((y_f * F.silu(z) + y_b * F.silu(z)) / 2)
    torch.testing.assert_close(m(u), expected, atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_cross_scan_equals_four_route_reference():
    m = _mixer(scan="cross")
    h, w = 3, 5
    u = torch.randn(2, h * w, 32)
    x, z = m.in_proj(u).chunk(2, dim=-1)
    rows = torch.arange(h * w).view(h, w)
    orders = [rows.flatten(), rows.flatten().flip(0), rows.t().flatten(), rows.t().flatten().flip(0)]
    expected = 0
    for order, suffix in zip(orders, ("", "_b", "_c", "_c_b")):
        y_r = _reference_route(m, x[:, order], suffix)
        back = torch.empty_like(y_r)
        back[:, order] = y_r  # route order -> row-major
        expected = expected + back * F.silu(z) / 4
    torch.testing.assert_close(m(u, grid=(h, w)), m.out_proj(expected), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match=r"grid=\(h, w\)"):
        m(torch.randn(1, 15, 32))
    torch.testing.assert_close(m(u[:, :9]), m(u[:, :9], grid=(3, 3)), atol=0, rtol=0)


ORDERS_3x4 = {
    "forward": [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11],
    "backward": [11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0],
    "columns_forward": [0, 4, 8, 1, 5, 9, 2, 6, 10, 3, 7, 11],
    "columns_backward": [11, 7, 3, 10, 6, 2, 9, 5, 1, 8, 4, 0],
}


@torch.no_grad()
@pytest.mark.parametrize("route", list(ORDERS_3x4))
def test_each_cross_route_sees_exactly_the_positions_before_it(route):
    """All routes but one silenced (zero conv -> x = 0 -> y = 0): an output then depends on its own
    token (gate, D) and on the tokens before it along that route, and on nothing else."""
    m = _mixer(scan="cross")
    for r, suffix in zip(m.routes, m.route_suffixes):
        if r != route:
            getattr(m, "conv1d" + suffix).weight.zero_()
            getattr(m, "conv1d" + suffix).bias.zero_()
        else:  # slow decay, so that the first token still reaches the last one
            getattr(m, "A_log" + suffix).fill_(math.log(0.5))
            getattr(m, "dt_proj" + suffix).bias.fill_(math.log(math.expm1(0.05)))
    rank = {pos: k for k, pos in enumerate(ORDERS_3x4[route])}
    u = torch.randn(1, 12, 32)
    base = m(u, grid=(3, 4))
    for q in range(12):
        u2 = u.clone()
        u2[:, q] += 1.0
        changed = (m(u2, grid=(3, 4)) - base).abs().amax(-1)[0] > 1e-6
        assert changed.tolist() == [rank[p] >= rank[q] for p in range(12)], (route, q)


def test_bidirectional_scan_sees_the_future_and_causal_does_not():
    u = torch.randn(1, 12, 32)
    u2 = u.clone()
    u2[:, -1] += 1.0
    causal, bi = _mixer(), _mixer(scan="bidirectional")
    with torch.no_grad():
        assert torch.allclose(causal(u)[:, :-1], causal(u2)[:, :-1], atol=1e-6)
        assert not torch.allclose(bi(u)[:, 0], bi(u2)[:, 0], atol=1e-6)


def test_mixer_gradients_and_bfloat16():
    m = _mixer(scan="cross")
    u = torch.randn(2, 16, 32, requires_grad=True)
    m(u).square().mean().backward()
    for name, p in m.named_parameters():
        assert p.grad is not None and bool(p.grad.abs().sum() > 0), name
    with torch.no_grad():
        ref = m(u)
        out = m.to(torch.bfloat16)(u.to(torch.bfloat16))
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref, atol=0.1, rtol=0.1)
