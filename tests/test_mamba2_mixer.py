"""The Mamba-2 (SSD) mixer's own math against independent references (tests/references.py): the per-token
recurrence `ssd_naive` (itself checked against the SSM written out with loops) for the chunked scan, its
gradients and the decoding step, at any chunk size and with grouped B and C; hand-written bidirectional and
cross scans (loop conv, recurrence, the gated RMSNorm formula) for the mixer, also with dt_limit; the
parameter names per route. What both mixers share is tested once, in tests/test_mixers.py."""

import pytest
import torch
import torch.nn.functional as F
from references import (
    causal_conv_silu_loop,
    grid_route_orders,
    rms_norm_gated_formula,
    spread_weights,
    ssd_naive,
    to_row_major,
)

from mlmamba.mamba2_mixer import Mamba2Mixer, ssd_chunk_scan, ssd_step


def _inputs(b=2, length=37, h=4, p=8, g=2, n=16, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(b, length, h, p, generator=gen)
    dt = torch.rand(b, length, h, generator=gen) * 0.5
    A = -torch.rand(h, generator=gen) * 2 - 0.1
    B = torch.randn(b, length, g, n, generator=gen)
    C = torch.randn(b, length, g, n, generator=gen)
    D = torch.randn(h, generator=gen)
    s0 = torch.randn(b, h, p, n, generator=gen)
    return x, dt, A, B, C, D, s0


# ---- the scan ---------------------------------------------------------------------------------


@pytest.mark.parametrize("grad", [True, False], ids=["autograd", "inference-in-place"])
@pytest.mark.parametrize("chunk_size", [1, 5, 8, 37, 64])
def test_chunk_scan_equals_recurrence_for_any_chunk_size(chunk_size, grad):
    x, dt, A, B, C, D, s0 = _inputs()
    y_ref, state_ref = ssd_naive(x, dt, A, B, C, D, initial_state=s0)
    s0_copy = s0.clone()
    with torch.set_grad_enabled(grad):
        y, state = ssd_chunk_scan(x, dt, A, B, C, chunk_size, D=D, initial_state=s0)
    torch.testing.assert_close(y, y_ref, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(state, state_ref, atol=1e-4, rtol=1e-4)
    assert torch.equal(s0, s0_copy)  # the initial state is not modified


@pytest.mark.parametrize("groups", [1, 2, 4])  # 4: one head per group
def test_chunk_scan_shares_b_and_c_within_each_group_of_heads(groups):
    """With g groups, heads [k * h / g, (k + 1) * h / g) read B and C of group k: the recurrence with B and C
    repeated for every head (one group per head, so no grouping in the reference)."""
    x, dt, A, B, C, D, s0 = _inputs(g=groups)
    y, state = ssd_chunk_scan(x, dt, A, B, C, 8, D=D, initial_state=s0)
    per_head = [t.repeat_interleave(4 // groups, dim=2) for t in (B, C)]
    y_ref, state_ref = ssd_naive(x, dt, A, *per_head, D, initial_state=s0)
    torch.testing.assert_close(y, y_ref, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(state, state_ref, atol=1e-4, rtol=1e-4)


def test_recurrence_matches_definition():
    """ssd_naive against the SSM written out with explicit loops over heads (no einsum, no grouping helpers)."""
    x, dt, A, B, C, D, _ = _inputs(b=1, length=6, h=2, p=3, g=1, n=4)
    y, _ = ssd_naive(x, dt, A, B, C, D)
    h_state = torch.zeros(2, 3, 4)
    for t in range(6):
        for head in range(2):
            decay = torch.exp(dt[0, t, head] * A[head])
            h_state[head] = decay * h_state[head] + dt[0, t, head] * torch.outer(x[0, t, head], B[0, t, 0])
            expected = h_state[head] @ C[0, t, 0] + D[head] * x[0, t, head]
            torch.testing.assert_close(y[0, t, head], expected, atol=1e-5, rtol=1e-5)


def test_chunk_scan_gradients_equal_recurrence_gradients():
    """Training differentiates the chunked scan: its gradients must match the recurrence's."""
    inputs = [t.double().requires_grad_() for t in _inputs(b=1, length=19, h=2, p=4, g=1, n=8)]
    x, dt, A, B, C, D, s0 = inputs
    y, state = ssd_chunk_scan(x, dt, A, B, C, 8, D=D, initial_state=s0)
    grads = torch.autograd.grad((y * y.detach().sin()).sum() + state.sum(), inputs)
    y_ref, state_ref = ssd_naive(x, dt, A, B, C, D, initial_state=s0)
    grads_ref = torch.autograd.grad((y_ref * y_ref.detach().sin()).sum() + state_ref.sum(), inputs)
    for g, g_ref in zip(grads, grads_ref):
        torch.testing.assert_close(g.double(), g_ref.double(), atol=1e-3, rtol=1e-3)


@pytest.mark.parametrize("grad", [True, False], ids=["autograd", "inference-in-place"])
def test_step_equals_recurrence_and_zero_dt_leaves_the_state_unchanged(grad):
    x, dt, A, B, C, D, s0 = _inputs(b=2, length=9)
    dt[:, 4:6] = 0.0  # what pads get: exp(0 * A) = 1 (no decay) and 0 * x * B (no input)
    y_ref, state_ref = ssd_naive(x, dt, A, B, C, D, initial_state=s0)
    state = s0.clone()
    ys = []
    with torch.set_grad_enabled(grad):
        for t in range(9):
            before = state.clone()
            ys.append(ssd_step(state, x[:, t], dt[:, t], A, B[:, t], C[:, t], D))
            if t in (4, 5):
                assert torch.equal(state, before)
    torch.testing.assert_close(torch.stack(ys, 1), y_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(state, state_ref, atol=1e-5, rtol=1e-5)


# ---- the mixer against hand-written references -----------------------------------------------------


def _mixer(**kw):
    torch.manual_seed(0)
    return spread_weights(Mamba2Mixer(32, d_state=16, headdim=8, ngroups=2, chunk_size=8, **kw), seed=1).eval()


def _reference_route(m, xBC, dt_raw, z, suffix):
    """One route written out by hand, inputs in the route's order: loop conv + SiLU, softplus (clamped to
    `dt_limit`), the recurrence, the gated RMSNorm formula -> (b, l, d_inner)."""
    conv, dt_bias, A_log, D = (getattr(m, name + suffix) for name in ("conv1d", "dt_bias", "A_log", "D"))
    b, length, _ = xBC.shape
    conv_out = causal_conv_silu_loop(xBC, conv)
    x, B, C = torch.split(conv_out, [m.d_inner, m.ngroups * m.d_state, m.ngroups * m.d_state], dim=-1)
    dt = F.softplus(dt_raw + dt_bias).clamp(*m.dt_limit)
    y, _ = ssd_naive(
        x.reshape(b, length, m.nheads, m.headdim),
        dt,
        -torch.exp(A_log),
        B.reshape(b, length, m.ngroups, m.d_state),
        C.reshape(b, length, m.ngroups, m.d_state),
        D,
    )
    return rms_norm_gated_formula(
        y.reshape(b, length, m.d_inner), z, m.norm.weight, m.d_inner // m.ngroups, m.norm.eps
    )


def _split(m, u):
    return torch.split(m.in_proj(u), [m.d_inner, m.conv_dim, m.nheads], dim=-1)  # z, xBC, dt


@torch.no_grad()
@pytest.mark.parametrize("dt_limit", [(0.0, float("inf")), (0.2, 0.6)], ids=["no-limit", "dt_limit"])
def test_causal_mixer_and_its_decoding_equal_the_reference(dt_limit):
    m = _mixer(dt_limit=dt_limit)
    u = torch.randn(2, 19, 32)
    z, xBC, dt = _split(m, u)
    expected = m.out_proj(_reference_route(m, xBC, dt, z, ""))
    assert expected.abs().mean() > 0.1  # a meaningful comparison, not of two tiny outputs
    torch.testing.assert_close(m(u), expected, atol=1e-4, rtol=1e-4)
    conv, ssm = torch.zeros(2, m.conv_dim, m.d_conv), torch.zeros(2, m.nheads, m.headdim, m.d_state)
    m(u[:, :11], conv_state=conv, ssm_state=ssm)
    steps = [m(u[:, t : t + 1], conv_state=conv, ssm_state=ssm) for t in range(11, 19)]  # `ssd_step`
    torch.testing.assert_close(torch.cat(steps, 1), expected[:, 11:], atol=1e-4, rtol=1e-4)


@torch.no_grad()
def test_dt_limit_changes_the_step_sizes():
    """The limit is applied (so the reference test above is not comparing two unclamped scans)."""
    m = _mixer()
    limited = _mixer(dt_limit=(0.2, 0.6))
    u = torch.randn(2, 19, 32)
    dt = F.softplus(_split(m, u)[2] + m.dt_bias)
    assert bool((dt < 0.2).any()) and bool((dt > 0.6).any())
    assert not torch.allclose(m(u), limited(u), atol=1e-3)


@torch.no_grad()
def test_bidirectional_scan_equals_two_direction_reference():
    m = _mixer(scan="bidirectional")
    u = torch.randn(2, 19, 32)
    z, xBC, dt = _split(m, u)
    y_f = _reference_route(m, xBC, dt, z, "")
    y_b = _reference_route(m, xBC.flip(1), dt.flip(1), z.flip(1), "_b")
    expected = m.out_proj((y_f + y_b.flip(1)) / 2)
    torch.testing.assert_close(m(u), expected, atol=1e-4, rtol=1e-4)


@torch.no_grad()
def test_cross_scan_equals_four_route_reference():
    m = _mixer(scan="cross")
    h, w = 3, 5
    u = torch.randn(2, h * w, 32)
    z, xBC, dt = _split(m, u)
    expected = 0
    for suffix, order in grid_route_orders(h, w):
        y_r = _reference_route(m, xBC[:, order], dt[:, order], z[:, order], suffix)
        expected = expected + to_row_major(y_r, order) / 4
    torch.testing.assert_close(m(u, grid=(h, w)), m.out_proj(expected), atol=1e-4, rtol=1e-4)


# ---- parameters ---------------------------------------------------------------------------------


def test_parameter_names_and_shapes_per_route():
    m = Mamba2Mixer(32, d_state=16, headdim=8, ngroups=2)  # d_inner 64, 8 heads, conv over 64 + 2 * 2 * 16
    shapes = {k: tuple(v.shape) for k, v in m.state_dict().items()}
    assert shapes == {
        "in_proj.weight": (2 * 64 + 2 * 2 * 16 + 8, 32),
        "conv1d.weight": (128, 1, 4),
        "conv1d.bias": (128,),
        "dt_bias": (8,),
        "A_log": (8,),
        "D": (8,),
        "norm.weight": (64,),
        "out_proj.weight": (32, 64),
    }
    cross = Mamba2Mixer(32, d_state=16, headdim=8, ngroups=2, scan="cross")
    assert cross.route_suffixes == ("", "_b", "_c", "_c_b")
    route_names = {"conv1d.weight", "conv1d.bias", "dt_bias", "A_log", "D"}
    expected = set(shapes)
    for suffix in ("_b", "_c", "_c_b"):
        expected |= {n.replace("conv1d.", f"conv1d{suffix}.") if "." in n else n + suffix for n in route_names}
    assert set(cross.state_dict()) == expected  # in_proj, norm and out_proj are shared


def test_heads_must_split_evenly():
    with pytest.raises(ValueError, match="must be a multiple of headdim = 24"):
        Mamba2Mixer(32, headdim=24)
    with pytest.raises(ValueError, match="nheads = 8 must be a multiple of ngroups = 3"):
        Mamba2Mixer(32, headdim=8, ngroups=3)
    assert Mamba2Mixer(32, headdim=8, ngroups=4).norm.group_size == 16  # the norm is per group
