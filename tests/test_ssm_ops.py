"""The ops both mixers share (`mlmamba.ssm_ops`), each on its own, against independent references: torch's
`nn.Conv1d` (causal padding, then SiLU) for the conv, its prefill and its steps; the hand-written 3 x 4 orders
for the scan routes; plain indexing for the padding alignment; the formula written out for the norms."""

import math

import pytest
import torch
import torch.nn.functional as F
from references import ORDERS_3x4, causal_conv_silu_loop, rms_norm_gated_formula
from torch import nn

from mlmamba.ssm_ops import (
    ROUTE_SUFFIXES,
    SCAN_ROUTES,
    RMSNorm,
    RMSNormGated,
    RoutePermutation,
    causal_conv_silu,
    causal_conv_step,
    check_contiguous,
    check_scan,
    conv_history,
    inverse_softplus_dt,
    left_align_index,
    resolve_grid,
    restore_order,
    route_order,
    update_conv_state,
)

# ---- scan routes ----------------------------------------------------------------------------------


def test_route_order_on_a_3x4_grid():
    assert SCAN_ROUTES["cross"] == tuple(ORDERS_3x4)
    assert SCAN_ROUTES["bidirectional"] == ("forward", "backward")
    assert SCAN_ROUTES["causal"] == ("forward",)
    assert [ROUTE_SUFFIXES[r] for r in SCAN_ROUTES["cross"]] == ["", "_b", "_c", "_c_b"]
    for route, expected in ORDERS_3x4.items():
        assert route_order(route, 3, 4).tolist() == expected
    with pytest.raises(ValueError, match="unknown route 'diagonal'"):
        route_order("diagonal", 3, 4)


@pytest.mark.parametrize("route", list(ORDERS_3x4))
def test_route_permutation_visits_the_route_order_and_comes_back(route):
    t = torch.randn(2, 12, 5)
    perm = RoutePermutation(route, 3, 4, t.device)
    in_route = perm.to_route(t)
    assert torch.equal(in_route, t[:, ORDERS_3x4[route]])
    assert torch.equal(perm.to_rows(in_route), t)
    assert torch.equal(perm.to_route(torch.arange(12)[None, :, None])[0, :, 0], torch.tensor(ORDERS_3x4[route]))


def test_resolve_grid_and_check_scan():
    assert resolve_grid("cross", 16, None) == (4, 4)  # a square grid by default
    assert resolve_grid("cross", 12, (3, 4)) == (3, 4)
    assert resolve_grid("causal", 15, None) == (1, 15)  # the flat sequence
    assert resolve_grid("bidirectional", 12, (4, 3)) == (4, 3)  # checked, then returned
    with pytest.raises(ValueError, match=r"grid=\(h, w\)"):
        resolve_grid("cross", 15, None)
    with pytest.raises(ValueError, match=r"grid=\(3, 4\) holds 12 tokens but the sequence has 15"):
        resolve_grid("cross", 15, (3, 4))
    with pytest.raises(ValueError, match="holds 12 tokens"):
        resolve_grid("causal", 15, (3, 4))
    assert check_scan("cross") == "cross"
    with pytest.raises(ValueError, match="scan must be one of"):
        check_scan("zigzag")


# ---- causal depthwise conv ------------------------------------------------------------------------


def _conv(d=6, k=4, bias=True, seed=0):
    torch.manual_seed(seed)
    conv = nn.Conv1d(d, d, k, groups=d, padding=k - 1, bias=bias)  # as the mixers build it
    with torch.no_grad():
        conv.weight.normal_()
        if bias:
            conv.bias.normal_()
    return conv


def _torch_conv_silu(x, conv):
    """torch's own causal conv: Conv1d with k - 1 zeros on both sides, the first l outputs, then SiLU."""
    return F.silu(conv(x.transpose(1, 2))[..., : x.shape[1]].transpose(1, 2))


@pytest.mark.parametrize("grad", [True, False], ids=["autograd", "inference-in-place"])
@pytest.mark.parametrize("bias", [True, False])
def test_causal_conv_silu_from_zeros_equals_torch_conv1d(bias, grad):
    conv = _conv(bias=bias)
    x = torch.randn(3, 11, 6)
    expected = _torch_conv_silu(x, conv).detach()
    torch.testing.assert_close(causal_conv_silu_loop(x, conv).detach(), expected, atol=1e-6, rtol=1e-6)
    with torch.set_grad_enabled(grad):
        out = causal_conv_silu(conv_history(x, None, 4), conv)
    assert out.shape == (3, 11, 6)
    torch.testing.assert_close(out.detach(), expected, atol=1e-6, rtol=1e-6)


@torch.no_grad()
@pytest.mark.parametrize("length", [1, 2, 9])  # shorter and longer than the kernel
def test_causal_conv_silu_after_a_conv_state_continues_the_sequence(length):
    conv = _conv()
    seq = torch.randn(2, 7 + length, 6)
    prefix, x = seq[:, :7], seq[:, 7:]
    state = prefix[:, -4:].transpose(1, 2).contiguous()  # (b, d, k): the last k inputs before x
    out = causal_conv_silu(conv_history(x, state, 4), conv)
    torch.testing.assert_close(out, _torch_conv_silu(seq, conv)[:, 7:], atol=1e-6, rtol=1e-6)


@torch.no_grad()
def test_causal_conv_steps_equal_the_conv_of_the_whole_sequence():
    conv = _conv()
    x = torch.randn(2, 9, 6)
    expected = _torch_conv_silu(x, conv)
    state = torch.zeros(2, 6, 4)
    for t in range(9):
        out = causal_conv_step(state, x[:, t], conv)
        torch.testing.assert_close(out, expected[:, t], atol=1e-6, rtol=1e-6)
        window = F.pad(x[:, : t + 1], (0, 0, 3, 0))[:, -4:]  # the last k inputs, zeros before the first
        assert torch.equal(state, window.transpose(1, 2))
    state16 = torch.zeros(2, 6, 4, dtype=torch.bfloat16)  # a bf16 model's state, fp32 inputs
    assert causal_conv_step(state16, x[:, 0], conv.to(torch.bfloat16)).dtype == torch.bfloat16


@torch.no_grad()
def test_update_conv_state_keeps_the_last_inputs_of_each_row():
    k, length = 4, 6
    x = torch.randn(4, length, 5)
    before = torch.randn(4, 5, k)
    history = conv_history(x, before, k)
    lengths = torch.tensor([6, 3, 1, 0])  # tokens at the front of each row; the last row has none
    state = before.clone()
    update_conv_state(state, history, lengths)
    for i, n in enumerate(lengths.tolist()):
        inputs = torch.cat([before[i].t(), x[i, :n]])  # every input of row i so far
        assert torch.equal(state[i], inputs[-k:].t()), i
    assert torch.equal(state[3], before[3])  # a row of length 0 keeps its state
    state = before.clone()
    update_conv_state(state, history)  # all l tokens
    assert torch.equal(state, x[:, -k:].transpose(1, 2))


# ---- padding alignment ----------------------------------------------------------------------------


def test_left_align_index_moves_each_block_to_the_front_and_restore_order_undoes_it():
    mask = torch.tensor(
        [
            [1, 1, 1, 1, 1, 1],  # no padding
            [0, 0, 0, 1, 1, 1],  # left padding
            [1, 1, 0, 0, 0, 0],  # right padding
            [0, 1, 1, 1, 0, 0],  # both sides
            [0, 0, 0, 0, 0, 0],  # nothing
        ]
    )
    t = torch.randn(5, 6, 3)
    index = left_align_index(mask)
    aligned = t.gather(1, index[:, :, None].expand_as(t))
    for i in range(5):
        real = mask[i].nonzero()[:, 0]
        n = len(real)
        assert torch.equal(aligned[i, :n], t[i, real]), i  # the tokens first, in their order
        assert torch.equal(mask[i, index[i]], torch.tensor([1] * n + [0] * (6 - n))), i
    assert torch.equal(restore_order(aligned, index), t)


def test_check_contiguous_refuses_a_gap():
    for ok in ([1, 1, 1, 1], [0, 0, 1, 1], [1, 1, 0, 0], [0, 1, 1, 0], [0, 0, 0, 0]):
        check_contiguous(torch.tensor([ok]))
    for gap in ([1, 1, 0, 1], [0, 1, 0, 1], [1, 0, 0, 1]):
        with pytest.raises(ValueError, match="one contiguous block"):
            check_contiguous(torch.tensor([[1, 1, 1, 1], gap]))  # found in any row


# ---- norms ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("grad", [True, False], ids=["autograd", "inference-in-place"])
@pytest.mark.parametrize("groups", [1, 4])
def test_rms_norm_gated_equals_the_formula(groups, grad, dtype):
    norm = RMSNormGated(16, group_size=16 // groups, eps=1e-5)
    with torch.no_grad():
        norm.weight.normal_(1.0, 0.5)
    x, z = torch.randn(2, 5, 16, dtype=dtype) * 3, torch.randn(2, 5, 16, dtype=dtype)
    x_copy, z_copy = x.clone(), z.clone()
    expected = rms_norm_gated_formula(x, z, norm.weight.detach(), 16 // groups, 1e-5).to(dtype)
    no_gate = rms_norm_gated_formula(x, None, norm.weight.detach(), 16 // groups, 1e-5).to(dtype)
    with torch.set_grad_enabled(grad):
        out, out_no_gate = norm(x, z), norm(x, None)
    assert out.dtype == dtype and out.requires_grad == grad
    tol = 1e-6 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(out.detach(), expected, atol=tol, rtol=tol)
    torch.testing.assert_close(out_no_gate.detach(), no_gate, atol=tol, rtol=tol)
    assert torch.equal(x, x_copy) and torch.equal(z, z_copy)  # the in-place path works on its own temporaries


@pytest.mark.parametrize("grad", [True, False], ids=["autograd", "inference-in-place"])
def test_rms_norm_equals_the_formula_and_leaves_its_input_alone(grad):
    norm = RMSNorm(16, eps=1e-5).to(torch.bfloat16)
    with torch.no_grad():
        norm.weight.normal_(1.0, 0.5)
    x = torch.randn(2, 5, 16) * 3  # fp32 residual stream, bf16 weight
    x_copy = x.clone()
    expected = rms_norm_gated_formula(x, None, norm.weight.detach(), 16, 1e-5).to(torch.bfloat16)
    with torch.set_grad_enabled(grad):
        out = norm(x)
    assert out.dtype == torch.bfloat16  # the weight's dtype
    torch.testing.assert_close(out.detach(), expected, atol=0, rtol=0)
    assert torch.equal(x, x_copy)


# ---- initialisation -------------------------------------------------------------------------------


def test_inverse_softplus_dt_draws_log_uniform_steps_above_the_floor():
    torch.manual_seed(0)
    dt = F.softplus(inverse_softplus_dt(4000, 1e-3, 1e-1, 1e-4))
    assert bool(((dt >= 1e-3 * (1 - 1e-5)) & (dt <= 1e-1 * (1 + 1e-5))).all())
    log_dt = dt.log()  # log-uniform: uniform in log space, mean at the middle, spread of a uniform
    torch.testing.assert_close(log_dt.mean().item(), math.log(1e-2), atol=0.1, rtol=0)
    torch.testing.assert_close(log_dt.std().item(), math.log(100) / math.sqrt(12), atol=0.05, rtol=0)
    floored = F.softplus(inverse_softplus_dt(4000, 1e-6, 1e-3, 1e-4))  # two thirds of the draws under the floor
    assert bool((floored >= 1e-4 * (1 - 1e-5)).all())
    assert 0.6 < float((floored < 1e-4 * (1 + 1e-5)).float().mean()) < 0.73
