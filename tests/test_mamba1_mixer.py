"""The Mamba-1 (selective scan) mixer's own math against independent references (tests/references.py): the
per-token recurrence `selective_scan_naive` (itself checked against the SSM written out by hand) for the
chunked scan, its gradients and the decoding step, at any chunk size; transformers' MambaMixer holding the
same weights; hand-written bidirectional and cross scans (loop conv, x_proj, dt_proj, recurrence); the
parameter names and their mamba_simple initialisation options. What both mixers share is tested once, in
tests/test_mixers.py."""

import math

import pytest
import torch
import torch.nn.functional as F
from references import causal_conv_silu_loop, grid_route_orders, selective_scan_naive, spread_weights, to_row_major

from mlmamba.mamba1_mixer import Mamba1Mixer, default_chunk_size, selective_scan, selective_step


def _inputs(b=2, length=37, d=12, n=8, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(b, length, d, generator=gen)
    dt = torch.rand(b, length, d, generator=gen) * 0.5
    A = -torch.rand(d, n, generator=gen) * 4 - 0.1
    B = torch.randn(b, length, n, generator=gen)
    C = torch.randn(b, length, n, generator=gen)
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
    x, dt, A, B, C, D, _ = _inputs(b=1, length=6, d=3, n=4)
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
    inputs = [t.double().requires_grad_() for t in _inputs(b=1, length=19, d=4, n=5)]
    x, dt, A, B, C, D, s0 = inputs
    y, state = selective_scan(x, dt, A, B, C, D=D, initial_state=s0, chunk_size=chunk_size)
    grads = torch.autograd.grad((y * y.detach().sin()).sum() + state.sum(), inputs)
    y_ref, state_ref = selective_scan_naive(x, dt, A, B, C, D, initial_state=s0)
    grads_ref = torch.autograd.grad((y_ref * y_ref.detach().sin()).sum() + state_ref.sum(), inputs)
    for g, g_ref in zip(grads, grads_ref):
        torch.testing.assert_close(g.double(), g_ref.double(), atol=1e-4, rtol=1e-4)


def test_step_equals_scan_and_zero_dt_leaves_the_state_unchanged():
    x, dt, A, B, C, D, s0 = _inputs(b=2, length=9)
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


def test_default_chunk_size_is_about_the_square_root_of_half_the_length():
    assert [default_chunk_size(n) for n in (0, 1, 2, 8, 50, 2048)] == [1, 1, 1, 2, 5, 32]


# ---- the mixer ---------------------------------------------------------------------------------


def _mixer(**kw):
    torch.manual_seed(0)
    return spread_weights(Mamba1Mixer(32, d_state=8, **kw), seed=1).eval()


def test_parameter_names_and_shapes():
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
    bi = Mamba1Mixer(40, scan="bidirectional")
    extra = {k for k in bi.state_dict()} - set(shapes)
    assert extra == {
        "conv1d_b.weight", "conv1d_b.bias", "x_proj_b.weight", "dt_proj_b.weight", "dt_proj_b.bias", "A_log_b", "D_b"
    }  # fmt: skip
    cross = Mamba1Mixer(40, scan="cross")
    assert cross.route_suffixes == ("", "_b", "_c", "_c_b")
    assert {k for k in cross.state_dict() if k.startswith("A_log")} == {"A_log", "A_log_b", "A_log_c", "A_log_c_b"}
    assert Mamba1Mixer(40, dt_rank=5).dt_proj.weight.shape == (80, 5)


def test_dt_init_options_as_mamba_simple():
    """dt_proj's weight: uniform in +-dt_rank**-0.5 * dt_scale ("random") or that constant ("constant")."""
    torch.manual_seed(0)
    m = Mamba1Mixer(40, dt_rank=4, dt_scale=2.0)
    bound = 4**-0.5 * 2.0
    assert m.dt_proj.weight.abs().max() <= bound and m.dt_proj.weight.abs().max() > 0.9 * bound
    constant = Mamba1Mixer(40, dt_rank=4, dt_scale=2.0, dt_init="constant")
    assert torch.equal(constant.dt_proj.weight, torch.full((80, 4), bound))
    assert m.dt_proj.bias._no_reinit and m.A_log._no_weight_decay and m.D._no_weight_decay  # mamba_ssm's flags
    with pytest.raises(ValueError, match="dt_init must be 'random' or 'constant'"):
        Mamba1Mixer(40, dt_init="zeros")


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


# ---- non-causal scans: hand-written references ----------------------------------------------------


def _reference_route(m, x, suffix):
    """One route written out by hand: x (b, l, d_inner) in the route's order -> y (b, l, d_inner), ungated.
    Causal depthwise conv as a loop, SiLU, x_proj, dt_proj + softplus, the per-token recurrence."""
    conv, x_proj, dt_proj, A_log, D = (getattr(m, n + suffix) for n in ("conv1d", "x_proj", "dt_proj", "A_log", "D"))
    xc = causal_conv_silu_loop(x, conv)
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
    expected = 0
    for suffix, order in grid_route_orders(h, w):
        y_r = _reference_route(m, x[:, order], suffix)
        expected = expected + to_row_major(y_r, order) * F.silu(z) / 4
    torch.testing.assert_close(m(u, grid=(h, w)), m.out_proj(expected), atol=1e-5, rtol=1e-5)
