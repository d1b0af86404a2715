"""The Mamba-2 mixer against independent references: a per-token recurrence and hand-written
bidirectional and cross scans; chunk-size independence; cached continuation; padding; the order in
which each route of the cross scan visits the patch grid."""

import math

import pytest
import torch
import torch.nn.functional as F

from mlmamba.mamba2_mixer import SCAN_ROUTES, Mamba2Mixer, route_order, ssd_chunk_scan, ssd_naive


def _inputs(b=2, l=37, h=4, p=8, g=2, n=16, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(b, l, h, p, generator=gen)
    dt = torch.rand(b, l, h, generator=gen) * 0.5
    A = -torch.rand(h, generator=gen) * 2 - 0.1
    B = torch.randn(b, l, g, n, generator=gen)
    C = torch.randn(b, l, g, n, generator=gen)
    D = torch.randn(h, generator=gen)
    s0 = torch.randn(b, h, p, n, generator=gen)
    return x, dt, A, B, C, D, s0


@pytest.mark.parametrize("grad", [True, False], ids=["autograd", "inference-in-place"])
@pytest.mark.parametrize("chunk_size", [1, 5, 8, 37, 64])
def test_chunk_scan_equals_recurrence_for_any_chunk_size(chunk_size, grad):
    x, dt, A, B, C, D, s0 = _inputs()
    y_ref, state_ref = ssd_naive(x, dt, A, B, C, D, initial_state=s0)
    with torch.set_grad_enabled(grad):
        y, state = ssd_chunk_scan(x, dt, A, B, C, chunk_size, D=D, initial_state=s0)
    torch.testing.assert_close(y, y_ref, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(state, state_ref, atol=1e-4, rtol=1e-4)


def test_recurrence_matches_definition():
    """ssd_naive against the SSM written out with explicit loops over heads (no einsum, no grouping helpers)."""
    x, dt, A, B, C, D, _ = _inputs(b=1, l=6, h=2, p=3, g=1, n=4)
    y, _ = ssd_naive(x, dt, A, B, C, D)
    h_state = torch.zeros(2, 3, 4)
    for t in range(6):
        for head in range(2):
            decay = torch.exp(dt[0, t, head] * A[head])
            h_state[head] = decay * h_state[head] + dt[0, t, head] * torch.outer(x[0, t, head], B[0, t, 0])
            expected = h_state[head] @ C[0, t, 0] + D[head] * x[0, t, head]
            torch.testing.assert_close(y[0, t, head], expected, atol=1e-5, rtol=1e-5)


def _mixer(**kw):
    torch.manual_seed(0)
    return Mamba2Mixer(32, d_state=16, headdim=8, ngroups=2, chunk_size=8, **kw).eval()


def _states(m, b):
    return torch.zeros(b, m.conv_dim, m.d_conv), torch.zeros(b, m.nheads, m.headdim, m.d_state)


@torch.no_grad()
def test_cached_continuation_equals_full_forward():
    m = _mixer()
    u = torch.randn(2, 21, 32)
    full = m(u)
    conv, ssm = _states(m, 2)
    parts = [m(u[:, :9], conv_state=conv, ssm_state=ssm), m(u[:, 9:14], conv_state=conv, ssm_state=ssm)]
    parts += [m(u[:, t : t + 1], conv_state=conv, ssm_state=ssm) for t in range(14, 21)]
    torch.testing.assert_close(torch.cat(parts, 1), full, atol=1e-5, rtol=1e-5)


@torch.no_grad()
@pytest.mark.parametrize("side", ["left", "right"])
def test_padding_never_touches_the_states(side):
    m = _mixer()
    u = torch.randn(3, 15, 32)
    lengths = [15, 9, 4]
    mask = torch.zeros(3, 15, dtype=torch.long)
    for i, n in enumerate(lengths):
        if side == "left":
            mask[i, 15 - n :] = 1
        else:
            mask[i, :n] = 1
    conv, ssm = _states(m, 3)
    out = m(u, attention_mask=mask, conv_state=conv, ssm_state=ssm)
    for i, n in enumerate(lengths):
        sl = slice(15 - n, 15) if side == "left" else slice(0, n)
        c1, s1 = _states(m, 1)
        alone = m(u[i : i + 1, sl], conv_state=c1, ssm_state=s1)
        torch.testing.assert_close(out[i, sl], alone[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(conv[i], c1[0], atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(ssm[i], s1[0], atol=1e-5, rtol=1e-5)


def test_mask_with_a_gap_is_refused():
    m = _mixer()
    mask = torch.tensor([[1, 1, 0, 1]])
    with pytest.raises(ValueError, match="contiguous"):
        m(torch.randn(1, 4, 32), attention_mask=mask)


def _reference_direction(m, xBC, dt_raw, z, conv, dt_bias, A_log, D):
    """One direction written out by hand: causal depthwise conv as a loop, softplus, recurrence, gated RMSNorm."""
    b, l, c = xBC.shape
    w = conv.weight[:, 0]  # (c, k)
    k = w.shape[1]
    padded = F.pad(xBC, (0, 0, k - 1, 0))
    conv_out = torch.stack([(padded[:, t : t + k] * w.T).sum(1) + conv.bias for t in range(l)], dim=1)
    conv_out = conv_out * torch.sigmoid(conv_out)
    x, B, C = torch.split(conv_out, [m.d_inner, m.ngroups * m.d_state, m.ngroups * m.d_state], dim=-1)
    dt = F.softplus(dt_raw + dt_bias)
    y, _ = ssd_naive(
        x.reshape(b, l, m.nheads, m.headdim),
        dt,
        -torch.exp(A_log),
        B.reshape(b, l, m.ngroups, m.d_state),
        C.reshape(b, l, m.ngroups, m.d_state),
        D,
    )
    y = y.reshape(b, l, m.d_inner) * F.silu(z)
    y = y.reshape(b, l, m.ngroups, -1)
    y = y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + m.norm.eps)
    return y.reshape(b, l, m.d_inner) * m.norm.weight


@torch.no_grad()
def test_bidirectional_scan_equals_two_direction_reference():
    m = _mixer(scan="bidirectional")
    for p in (m.conv1d_b.bias, m.dt_bias_b, m.A_log_b, m.D_b, m.conv1d.bias, m.norm.weight):
        p.normal_()  # directions must differ for the test to tell them apart
    u = torch.randn(2, 19, 32)
    z, xBC, dt = torch.split(m.in_proj(u), [m.d_inner, m.conv_dim, m.nheads], dim=-1)
    y_f = _reference_direction(m, xBC, dt, z, m.conv1d, m.dt_bias, m.A_log, m.D)
    y_b = _reference_direction(m, xBC.flip(1), dt.flip(1), z.flip(1), m.conv1d_b, m.dt_bias_b, m.A_log_b, m.D_b)
    expected = m.out_proj((y_f + y_b.flip(1)) / 2)
    torch.testing.assert_close(m(u), expected, atol=1e-4, rtol=1e-4)


def test_bidirectional_scan_sees_the_future_and_causal_does_not():
    u = torch.randn(1, 12, 32)
    u2 = u.clone()
    u2[:, -1] += 1.0
    causal, bi = _mixer(), _mixer(scan="bidirectional")
    with torch.no_grad():
        assert torch.allclose(causal(u)[:, :-1], causal(u2)[:, :-1], atol=1e-6)
        assert not torch.allclose(bi(u)[:, 0], bi(u2)[:, 0], atol=1e-6)


def test_chunk_scan_gradients_equal_recurrence_gradients():
    """Training differentiates the chunked scan: its gradients must match the recurrence's."""
    inputs = [t.double().requires_grad_() for t in _inputs(b=1, l=19, h=2, p=4, g=1, n=8)]
    x, dt, A, B, C, D, s0 = inputs
    y, state = ssd_chunk_scan(x, dt, A, B, C, 8, D=D, initial_state=s0)
    grads = torch.autograd.grad((y * y.detach().sin()).sum() + state.sum(), inputs)
    y_ref, state_ref = ssd_naive(x, dt, A, B, C, D, initial_state=s0)
    grads_ref = torch.autograd.grad((y_ref * y_ref.detach().sin()).sum() + state_ref.sum(), inputs)
    for g, g_ref in zip(grads, grads_ref):
        torch.testing.assert_close(g.double(), g_ref.double(), atol=1e-3, rtol=1e-3)


# ---- cross scan (CSM): four routes over an h x w grid ---------------------------------------

# Hand-written visiting orders on a 3 x 4 grid whose tokens arrive row-major (position = 4 * row + col).
ORDERS_3x4 = {
    "forward": [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11],
    "backward": [11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0],
    "columns_forward": [0, 4, 8, 1, 5, 9, 2, 6, 10, 3, 7, 11],
    "columns_backward": [11, 7, 3, 10, 6, 2, 9, 5, 1, 8, 4, 0],
}


def test_route_order_on_a_3x4_grid():
    assert SCAN_ROUTES["cross"] == tuple(ORDERS_3x4)
    assert SCAN_ROUTES["bidirectional"] == ("forward", "backward")
    for route, expected in ORDERS_3x4.items():
        assert route_order(route, 3, 4).tolist() == expected


def _cross_mixer():
    m = _mixer(scan="cross")
    with torch.no_grad():
        for suffix in m.route_suffixes:  # routes must differ for the tests to tell them apart
            for p in (getattr(m, "conv1d" + suffix).bias, getattr(m, "dt_bias" + suffix), getattr(m, "D" + suffix)):
                p.normal_()
        m.norm.weight.normal_()
    return m


def test_cross_mixer_parameters_per_route():
    m = _mixer(scan="cross")
    assert m.route_suffixes == ("", "_b", "_c", "_c_b")
    names = set(dict(m.named_parameters()))
    for suffix in m.route_suffixes:
        expected = {"conv1d.weight", "conv1d.bias", "dt_bias", "A_log", "D"}
        assert {name.replace("conv1d.", f"conv1d{suffix}.") if "." in name else name + suffix for name in expected} <= names
    assert not any(n.startswith(("in_proj_", "norm_", "out_proj_")) for n in names)  # shared
    for suffix in m.route_suffixes:  # reset_ssm_parameters initialised every route
        dt = F.softplus(getattr(m, "dt_bias" + suffix))
        assert bool(((dt > 0.9e-4) & (dt < 0.11)).all())
        A = torch.exp(getattr(m, "A_log" + suffix))  # A_init_range (1, 16)
        assert bool(((A >= 1 - 1e-5) & (A <= 16 + 1e-4)).all())
    m2 = _mixer(scan="cross")
    assert not torch.equal(m2.dt_bias, m2.dt_bias_c)  # each route drew its own dt


@torch.no_grad()
@pytest.mark.parametrize("route", list(ORDERS_3x4))
def test_each_cross_route_sees_exactly_the_positions_before_it(route):
    """Silence all routes but one (zero conv -> x, B, C = 0 -> y = 0, and norm(0) = 0). An output then
    depends on its own token (z, D) and on the tokens before it along that route, and on nothing else."""
    m = _cross_mixer()
    for r, suffix in zip(m.routes, m.route_suffixes):
        if r != route:
            getattr(m, "conv1d" + suffix).weight.zero_()
            getattr(m, "conv1d" + suffix).bias.zero_()
        else:  # slow decay (dt = 0.05, A = -1), so that the first token still reaches the last one
            getattr(m, "dt_bias" + suffix).fill_(math.log(math.expm1(0.05)))
            getattr(m, "A_log" + suffix).zero_()
    order = ORDERS_3x4[route]
    rank = {pos: k for k, pos in enumerate(order)}
    u = torch.randn(1, 12, 32)
    base = m(u, grid=(3, 4))
    for q in range(12):
        u2 = u.clone()
        u2[:, q] += 1.0
        changed = (m(u2, grid=(3, 4)) - base).abs().amax(-1)[0] > 1e-6
        expected = [rank[p] >= rank[q] for p in range(12)]
        assert changed.tolist() == expected, (route, q)


@torch.no_grad()
def test_cross_scan_equals_four_route_reference():
    m = _cross_mixer()
    h, w = 3, 5
    u = torch.randn(2, h * w, 32)
    z, xBC, dt = torch.split(m.in_proj(u), [m.d_inner, m.conv_dim, m.nheads], dim=-1)
    rows = torch.arange(h * w).view(h, w)
    orders = [rows.flatten(), rows.flatten().flip(0), rows.t().flatten(), rows.t().flatten().flip(0)]
    expected = 0
    for order, suffix in zip(orders, ("", "_b", "_c", "_c_b")):
        params = [getattr(m, name + suffix) for name in ("conv1d", "dt_bias", "A_log", "D")]
        y_r = _reference_direction(m, xBC[:, order], dt[:, order], z[:, order], *params)
        back = torch.empty_like(y_r)
        back[:, order] = y_r  # route order -> row-major
        expected = expected + back / 4
    expected = m.out_proj(expected)
    torch.testing.assert_close(m(u, grid=(h, w)), expected, atol=1e-4, rtol=1e-4)


@torch.no_grad()
def test_cross_scan_grid_argument():
    m = _cross_mixer()
    u = torch.randn(1, 16, 32)
    torch.testing.assert_close(m(u), m(u, grid=(4, 4)), atol=0, rtol=0)  # a square grid by default
    assert not torch.allclose(m(u, grid=(2, 8)), m(u, grid=(4, 4)), atol=1e-5)
    with pytest.raises(ValueError, match=r"grid=\(h, w\)"):
        m(torch.randn(1, 15, 32))
    with pytest.raises(ValueError, match="holds 12 tokens"):
        m(torch.randn(1, 15, 32), grid=(3, 4))
    with pytest.raises(ValueError, match="scan must be one of"):
        _mixer(scan="zigzag")


def test_mamba_ssm_modules_import_without_the_package_init(tmp_path, monkeypatch):
    """An install of mamba_ssm's Python + Triton part alone (2.3.2.post1 built without CUDA) fails in its
    package __init__, which imports the compiled Mamba-1 extension; `import_mamba_ssm` still reaches the
    Triton modules. (tests/test_kernels_interpreted.py runs the real package this way.)"""
    import sys

    from mlmamba.mamba2_mixer import import_mamba_ssm

    root = tmp_path / "mamba_ssm"
    (root / "ops" / "triton").mkdir(parents=True)
    (root / "__init__.py").write_text("import selective_scan_cuda_is_not_built_here\n")
    (root / "ops" / "__init__.py").write_text("")
    (root / "ops" / "triton" / "__init__.py").write_text("")
    (root / "ops" / "triton" / "helper.py").write_text("VALUE = 42\n")
    (root / "ops" / "triton" / "kernel.py").write_text("from mamba_ssm.ops.triton.helper import VALUE\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in [n for n in sys.modules if n.split(".")[0] == "mamba_ssm"]:
        monkeypatch.delitem(sys.modules, name)
    try:
        with pytest.raises(ImportError, match="selective_scan_cuda_is_not_built_here"):
            import mamba_ssm.ops.triton.kernel  # noqa: F401
        assert import_mamba_ssm("ops.triton.kernel").VALUE == 42
        with pytest.raises(ImportError):
            import_mamba_ssm("ops.triton.missing")  # a module's own failure is not hidden
    finally:
        for name in [n for n in sys.modules if n.split(".")[0] == "mamba_ssm"]:
            del sys.modules[name]
