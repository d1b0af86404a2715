"""What the Mamba-2 and Mamba-1 mixers share (`ssm_ops.ScanMixer`), tested once for both. The references are
the mixer itself in simpler situations: a row run alone for padding, the whole sequence at once for cached
continuation, a perturbed input for what each route sees (against the hand-written orders), the fp32 mixer for
bf16; mamba_ssm's documented values for the initialisation; a kernel set that raises for the kernel choice.
Each mixer's own math is tested in tests/test_mamba2_mixer.py and tests/test_mamba1_mixer.py."""

import math
import sys
from dataclasses import dataclass, fields
from typing import Callable

import pytest
import torch
import torch.nn.functional as F
from references import ORDERS_3x4, spread_weights

from mlmamba import kernels
from mlmamba.kernels import Kernels, get_kernels, import_mamba_ssm
from mlmamba.mamba1_mixer import Mamba1Mixer
from mlmamba.mamba2_mixer import Mamba2Mixer


@dataclass(frozen=True)
class Kind:
    cls: type
    kwargs: dict  # small sizes, chunked scans even on short sequences
    states: Callable  # (mixer, batch) -> zero conv_state, ssm_state
    ssm_names: tuple[str, ...]  # the SSM parameters of a route, "{}" for the route's suffix
    check_A: Callable  # (mixer, A_log) -> asserts mamba_ssm's initial A


def _check_A_mamba2(m, A_log):  # A = -U(A_init_range) per head
    A = torch.exp(A_log)
    assert bool(((A >= m.A_init_range[0] * (1 - 1e-6)) & (A <= m.A_init_range[1] * (1 + 1e-6))).all())
    assert len(set(A.tolist())) == A.numel()  # drawn


def _check_A_mamba1(m, A_log):  # S4D-real: A = -(1, ..., d_state) for every channel
    assert torch.equal(A_log, torch.log(torch.arange(1, m.d_state + 1.0)).expand(m.d_inner, -1))


KINDS = {
    "mamba2": Kind(
        Mamba2Mixer,
        dict(d_state=16, headdim=8, ngroups=2, chunk_size=8),
        lambda m, b: (torch.zeros(b, m.conv_dim, m.d_conv), torch.zeros(b, m.nheads, m.headdim, m.d_state)),
        ("dt_bias{}", "A_log{}", "D{}"),
        _check_A_mamba2,
    ),
    "mamba1": Kind(
        Mamba1Mixer,
        dict(d_state=8),
        lambda m, b: (torch.zeros(b, m.d_inner, m.d_conv), torch.zeros(b, m.d_inner, m.d_state)),
        ("dt_proj{}.weight", "dt_proj{}.bias", "A_log{}", "D{}"),
        _check_A_mamba1,
    ),
}


@pytest.fixture(params=list(KINDS))
def kind(request) -> Kind:
    return KINDS[request.param]


def make(kind: Kind, **kw):
    """A mixer of `kind` (d_model 32) with every weight at unit scale (the default init makes most outputs tiny,
    and every route is drawn differently)."""
    torch.manual_seed(0)
    return spread_weights(kind.cls(32, **{**kind.kwargs, **kw}), seed=1).eval()


def dt_bias(m, suffix=""):
    return m.get_parameter("dt_bias" + suffix if isinstance(m, Mamba2Mixer) else f"dt_proj{suffix}.bias")


# ---- decoding state ------------------------------------------------------------------------------


@torch.no_grad()
@pytest.mark.parametrize("chunk_size", [None, 4], ids=["default-chunks", "chunk4"])
def test_cached_continuation_equals_full_forward(kind, chunk_size):
    m = make(kind, **({"chunk_size": chunk_size} if chunk_size else {}))
    u = torch.randn(2, 21, 32)
    full = m(u)
    conv, ssm = kind.states(m, 2)
    parts = [m(u[:, :9], conv_state=conv, ssm_state=ssm), m(u[:, 9:14], conv_state=conv, ssm_state=ssm)]
    parts += [m(u[:, t : t + 1], conv_state=conv, ssm_state=ssm) for t in range(14, 21)]  # decoding steps
    torch.testing.assert_close(torch.cat(parts, 1), full, atol=1e-5, rtol=1e-5)
    # the states after the pieces are the states after the whole sequence at once
    conv_full, ssm_full = kind.states(m, 2)
    m(u, conv_state=conv_full, ssm_state=ssm_full)
    torch.testing.assert_close(conv, conv_full, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(ssm, ssm_full, atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_continuing_a_prefill_from_states_equals_full_forward(kind):
    m = make(kind)
    u = torch.randn(2, 30, 32)
    full = m(u)
    conv, ssm = kind.states(m, 2)
    m(u[:, :17], conv_state=conv, ssm_state=ssm)
    assert ssm.abs().max() > 0.1
    torch.testing.assert_close(m(u[:, 17:], conv_state=conv, ssm_state=ssm), full[:, 17:], atol=1e-5, rtol=1e-5)
    # a continuation shorter than the conv kernel
    conv, ssm = kind.states(m, 2)
    m(u[:, :28], conv_state=conv, ssm_state=ssm)
    torch.testing.assert_close(m(u[:, 28:], conv_state=conv, ssm_state=ssm), full[:, 28:], atol=1e-5, rtol=1e-5)


# ---- padding --------------------------------------------------------------------------------------


@torch.no_grad()
@pytest.mark.parametrize("side", ["left", "right"])
def test_padding_never_touches_the_states(kind, side):
    """Each row of a padded batch equals the row run alone, from the same (non-zero) states, and so do the
    states after it and the next decoding step; a row without tokens keeps its states."""
    m = make(kind)
    u = torch.randn(4, 15, 32)
    lengths = [15, 9, 2, 0]  # 2: fewer tokens than the conv kernel
    mask = torch.zeros(4, 15, dtype=torch.long)
    for i, n in enumerate(lengths):
        if side == "left":
            mask[i, 15 - n :] = 1
        else:
            mask[i, :n] = 1
    conv, ssm = kind.states(m, 4)
    m(torch.randn(4, 5, 32), conv_state=conv, ssm_state=ssm)  # start from non-zero states
    conv_rows, ssm_rows = conv.clone(), ssm.clone()
    out = m(u, attention_mask=mask, conv_state=conv, ssm_state=ssm)
    no_state = m(u, attention_mask=mask)
    nxt = torch.randn(4, 1, 32)
    for i, n in enumerate(lengths[:3]):
        sl = slice(15 - n, 15) if side == "left" else slice(0, n)
        c1, s1 = conv_rows[i : i + 1].clone(), ssm_rows[i : i + 1].clone()
        alone = m(u[i : i + 1, sl], conv_state=c1, ssm_state=s1)
        torch.testing.assert_close(out[i, sl], alone[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(conv[i], c1[0], atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(ssm[i], s1[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(no_state[i, sl], m(u[i : i + 1, sl])[0], atol=1e-5, rtol=1e-5)
    assert torch.equal(conv[3], conv_rows[3]) and torch.equal(ssm[3], ssm_rows[3])
    # the next token continues every row as if it had been run alone
    step = m(nxt, conv_state=conv, ssm_state=ssm)
    for i, n in enumerate(lengths[:3]):
        sl = slice(15 - n, 15) if side == "left" else slice(0, n)
        c1, s1 = conv_rows[i : i + 1].clone(), ssm_rows[i : i + 1].clone()
        alone = m(torch.cat([u[i : i + 1, sl], nxt[i : i + 1]], 1), conv_state=c1, ssm_state=s1)
        torch.testing.assert_close(step[i, 0], alone[0, -1], atol=1e-5, rtol=1e-5)


def test_bad_masks_and_states_are_refused(kind):
    m = make(kind)
    u = torch.randn(1, 4, 32)
    with pytest.raises(ValueError, match="contiguous"):
        m(u, attention_mask=torch.tensor([[1, 1, 0, 1]]))
    conv, ssm = kind.states(m, 1)
    with pytest.raises(ValueError, match="both"):
        m(u, conv_state=conv)
    with pytest.raises(ValueError, match="both"):
        m(u, ssm_state=ssm)
    bi = make(kind, scan="bidirectional")
    with pytest.raises(ValueError, match="a bidirectional scan has no decode state"):
        bi(u, *kind.states(bi, 1))
    with pytest.raises(ValueError, match="attention_mask is not supported"):
        bi(u, attention_mask=torch.tensor([[0, 1, 1, 1]]))
    torch.testing.assert_close(bi(u, attention_mask=torch.ones(1, 4)), bi(u), atol=0, rtol=0)  # no padding: fine


# ---- routes ---------------------------------------------------------------------------------------


def test_bidirectional_scan_sees_the_future_and_causal_does_not(kind):
    u = torch.randn(1, 12, 32)
    u2 = u.clone()
    u2[:, -1] += 1.0
    causal, bi = make(kind), make(kind, scan="bidirectional")
    with torch.no_grad():
        assert torch.allclose(causal(u)[:, :-1], causal(u2)[:, :-1], atol=1e-6)
        assert not torch.allclose(causal(u)[:, -1], causal(u2)[:, -1], atol=1e-3)
        assert not torch.allclose(bi(u)[:, 0], bi(u2)[:, 0], atol=1e-3)


@torch.no_grad()
@pytest.mark.parametrize("route", list(ORDERS_3x4))
def test_each_cross_route_sees_exactly_the_positions_before_it(kind, route):
    """Silence all routes but one (zero conv -> x, B, C = 0 -> y = 0, and the gate or norm of 0 is 0). An output
    then depends on its own token (gate, D) and on the tokens before it along that route, and on nothing else."""
    m = make(kind, scan="cross")
    for r, suffix in zip(m.routes, m.route_suffixes):
        if r != route:
            getattr(m, "conv1d" + suffix).weight.zero_()
            getattr(m, "conv1d" + suffix).bias.zero_()
        else:  # slow decay (A = -1, dt around 0.05), so that the first token still reaches the last one
            getattr(m, "A_log" + suffix).zero_()
            dt_bias(m, suffix).fill_(math.log(math.expm1(0.05)))
    rank = {pos: k for k, pos in enumerate(ORDERS_3x4[route])}
    u = torch.randn(1, 12, 32)
    base = m(u, grid=(3, 4))
    for q in range(12):
        u2 = u.clone()
        u2[:, q] += 1.0
        changed = (m(u2, grid=(3, 4)) - base).abs().amax(-1)[0] > 1e-6
        assert changed.tolist() == [rank[p] >= rank[q] for p in range(12)], (route, q)


@torch.no_grad()
def test_cross_scan_grid_argument(kind):
    m = make(kind, scan="cross")
    u = torch.randn(1, 16, 32)
    torch.testing.assert_close(m(u), m(u, grid=(4, 4)), atol=0, rtol=0)  # a square grid by default
    assert not torch.allclose(m(u, grid=(2, 8)), m(u, grid=(4, 4)), atol=1e-3)
    with pytest.raises(ValueError, match=r"grid=\(h, w\)"):
        m(torch.randn(1, 15, 32))
    with pytest.raises(ValueError, match="holds 12 tokens"):
        m(torch.randn(1, 15, 32), grid=(3, 4))
    for scan in ("causal", "bidirectional"):  # the other scans only check the grid
        other = make(kind, scan=scan)
        torch.testing.assert_close(other(u, grid=(2, 8)), other(u), atol=0, rtol=0)
        with pytest.raises(ValueError, match="holds 12 tokens"):
            other(torch.randn(1, 15, 32), grid=(3, 4))
    with pytest.raises(ValueError, match="scan must be one of"):
        make(kind, scan="zigzag")


# ---- chunks, gradients, dtypes --------------------------------------------------------------------


@torch.no_grad()
@pytest.mark.parametrize("scan", ["causal", "cross"])
def test_output_does_not_depend_on_the_chunk_size(kind, scan):
    u = torch.randn(2, 36, 32)
    outputs = [make(kind, scan=scan, chunk_size=c)(u) for c in (1, 5, 8, 256)]
    assert outputs[0].abs().mean() > 0.1
    for out in outputs[1:]:
        torch.testing.assert_close(out, outputs[0], atol=1e-5, rtol=1e-5)


def test_gradients_reach_every_parameter_and_bfloat16_stays_close(kind):
    m = make(kind, scan="cross")
    u = torch.randn(2, 16, 32, requires_grad=True)
    m(u).square().mean().backward()
    for name, p in m.named_parameters():
        assert p.grad is not None and bool(p.grad.abs().sum() > 0), name
    assert bool(u.grad.abs().sum() > 0)
    with torch.no_grad():
        ref = m(u)
        out = m.to(torch.bfloat16)(u.to(torch.bfloat16))
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref, atol=0.1, rtol=0.1)


# ---- initialisation --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "dt_min, dt_max, floor", [(1e-3, 1e-1, 1e-4), (1e-6, 1e-3, 1e-4)], ids=["default-dt", "floored-dt"]
)
def test_reset_ssm_parameters_gives_mamba_ssm_initial_values(kind, dt_min, dt_max, floor):
    """After `initialize=False` + `reset_ssm_parameters()`, every route holds mamba_ssm's initialisation:
    dt = softplus(dt bias) log-uniform in [dt_min, dt_max], raised to dt_init_floor; A as the mixer documents;
    D = 1. `initialize=True` is exactly that; `copy` writes every SSM parameter of every route."""
    kw = dict(kind.kwargs, scan="cross", dt_min=dt_min, dt_max=dt_max, dt_init_floor=floor)
    names = {name.format(suffix) for suffix in ("", "_b", "_c", "_c_b") for name in kind.ssm_names}
    torch.manual_seed(0)
    m = kind.cls(32, **kw, initialize=False)
    with torch.no_grad():
        for name in names:
            m.get_parameter(name).fill_(float("nan"))  # so that every value below was written by the reset
    m.reset_ssm_parameters()
    for suffix in m.route_suffixes:
        dt = F.softplus(dt_bias(m, suffix).detach())
        assert bool(((dt >= max(dt_min, floor) * (1 - 1e-5)) & (dt <= dt_max * (1 + 1e-5))).all()), suffix
        kind.check_A(m, m.get_parameter("A_log" + suffix).detach())
        assert torch.equal(m.get_parameter("D" + suffix), torch.ones_like(m.get_parameter("D" + suffix)))
        if isinstance(m, Mamba1Mixer):
            assert m.get_parameter(f"dt_proj{suffix}.weight").abs().max() <= m.dt_rank**-0.5
    if floor > dt_min:
        assert bool((F.softplus(m.dt_bias if isinstance(m, Mamba2Mixer) else m.dt_proj.bias) < floor * 1.001).any())
    assert not torch.equal(dt_bias(m), dt_bias(m, "_c"))  # each route drew its own dt
    assert not any(bool(p.isnan().any()) for p in m.parameters())

    torch.manual_seed(0)
    initialized = kind.cls(32, **kw)
    torch.manual_seed(0)
    deferred = kind.cls(32, **kw, initialize=False)
    deferred.reset_ssm_parameters()
    for (name, p), q in zip(initialized.state_dict().items(), deferred.state_dict().values()):
        assert torch.equal(p, q), name

    by_id = {id(p): name for name, p in m.named_parameters()}
    written = []
    m.reset_ssm_parameters(copy=lambda param, value: written.append(by_id[id(param)]))
    assert sorted(written) == sorted(names)
    with torch.device("meta"):
        on_meta = kind.cls(32, **kw)  # what transformers builds before loading weights
    on_meta.reset_ssm_parameters(copy=lambda param, value: pytest.fail("wrote a parameter on the meta device"))


def test_initialize_false_leaves_the_ssm_parameters_to_the_caller(kind, monkeypatch):
    calls = []
    monkeypatch.setattr(kind.cls, "reset_ssm_parameters", lambda self, *a, **k: calls.append(self))
    kind.cls(32, **kind.kwargs, initialize=False)
    assert calls == []
    m = kind.cls(32, **kind.kwargs)
    assert calls == [m]


# ---- kernels --------------------------------------------------------------------------------------


@torch.no_grad()
def test_cpu_tensors_never_reach_the_kernels(kind, monkeypatch):
    """With MLMAMBA_DISABLE_KERNELS unset and a kernel set that is available (and raises when called), a CUDA
    tensor would get the kernels; CPU tensors get None, and every path of the mixer runs its torch code."""
    monkeypatch.delenv("MLMAMBA_DISABLE_KERNELS", raising=False)

    def refuse(*args, **kwargs):
        raise AssertionError("a CPU tensor reached a GPU kernel")

    trap = Kernels(*[refuse] * len(fields(Kernels)))
    monkeypatch.setattr(kernels, "load_kernels", lambda: trap)

    class OnCuda:
        is_cuda = True

    assert get_kernels(OnCuda()) is trap  # the trap is armed: a tensor taken for a CUDA one would reach it
    assert get_kernels(torch.zeros(1)) is None

    def run_all():
        m, u = make(kind), torch.randn(2, 10, 32)
        conv, ssm = kind.states(m, 2)
        mask = torch.tensor([[0, 0, 1, 1, 1, 1, 1, 1, 1, 1], [1] * 10])
        outs = [m(u[:, :8], attention_mask=mask[:, :8], conv_state=conv, ssm_state=ssm)]  # padded prefill
        outs += [m(u[:, 8:9], conv_state=conv, ssm_state=ssm), m(u[:, 9:], conv_state=conv, ssm_state=ssm)]
        outs += [m(u), make(kind, scan="cross")(u[:, :9])]
        return outs

    outs = run_all()
    monkeypatch.setenv("MLMAMBA_DISABLE_KERNELS", "1")
    assert get_kernels(OnCuda()) is None
    for out, torch_only in zip(outs, run_all()):
        assert bool(out.isfinite().all())
        torch.testing.assert_close(out, torch_only, atol=0, rtol=0)


def test_mamba_ssm_modules_import_without_the_package_init(tmp_path, monkeypatch):
    """An install of mamba_ssm's Python + Triton part alone (2.3.2.post1 built without CUDA) fails in its
    package __init__, which imports the compiled Mamba-1 extension; `import_mamba_ssm` still reaches the
    Triton modules. (tests/test_kernels_interpreted.py runs the real package this way.)"""
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
