"""Each collective's forward and its conjugate backward, in 2 real gloo processes, and the
grouped (fused-weight) projections against plain F.linear."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from megavit.parallel.layers import ColumnParallelLinear, RowParallelLinear
from megavit.parallel.mappings import (copy_to_tp, gather_from_sequence_parallel, gather_from_tp,
                                       reduce_from_tp, reduce_scatter_to_sequence_parallel,
                                       scatter_to_sequence_parallel, scatter_to_tp)
from megavit.parallel.sharding import initialize_parameters
from megavit.parallel.state import ParallelState, serial_state
from tests.harness import run_distributed


def _rank_tensor(pstate: ParallelState, *shape: int) -> torch.Tensor:
    """Different values on each rank: rank * 100 + arange."""
    return (torch.arange(float(torch.Size(shape).numel())).reshape(shape)
            + 100 * pstate.tp.rank).requires_grad_()


def conjugates(pstate: ParallelState) -> dict:
    tp, out = pstate.tp, {}
    for name, fn in [("copy", copy_to_tp), ("reduce", reduce_from_tp),
                     ("scatter", scatter_to_tp), ("gather", gather_from_tp),
                     ("sp_scatter", scatter_to_sequence_parallel),
                     ("sp_gather", gather_from_sequence_parallel),
                     ("sp_reduce_scatter", reduce_scatter_to_sequence_parallel)]:
        x = _rank_tensor(pstate, 2, 4)
        y = fn(x * 1.0, tp)                       # * 1.0: reduce's in-place all-reduce
        grad = torch.ones_like(y) * (tp.rank + 1)
        y.backward(grad)
        out[name] = (y.detach(), x.grad)
    return out


def copy_beside_a_branch(pstate: ParallelState) -> tuple:
    """y = b + copy_to_tp(a): the backward all-reduce must not touch b's gradient, which
    autograd may pass as the very same tensor."""
    a = torch.tensor([1.0, 2.0, 3.0], requires_grad=True)
    b = torch.tensor([1.0, 2.0, 3.0], requires_grad=True)
    (b * 1.0 + copy_to_tp(a * 1.0, pstate.tp)).backward(torch.tensor([1.0, 2.0, 3.0]))
    return a.grad, b.grad


@pytest.fixture(scope="module")
def tp2():
    jobs = {"conjugates": (conjugates, ()), "branch": (copy_beside_a_branch, ())}
    results = run_distributed(2, 2, jobs)
    return [dict(r, branch=b) for r, b in zip(results["conjugates"], results["branch"])]


def test_copy_backward_leaves_sibling_gradients_alone(tp2):
    for got in tp2:
        a_grad, b_grad = got["branch"]
        assert torch.equal(a_grad, torch.tensor([2.0, 4.0, 6.0]))   # summed over 2 ranks
        assert torch.equal(b_grad, torch.tensor([1.0, 2.0, 3.0]))   # untouched


def test_copy_is_identity_forward_and_all_reduce_backward(tp2):
    for rank, got in enumerate(tp2):
        y, g = got["copy"]
        assert torch.equal(y, torch.arange(8.0).reshape(2, 4) + 100 * rank)
        assert torch.equal(g, torch.full((2, 4), 3.0))          # 1 + 2


def test_reduce_is_all_reduce_forward_and_identity_backward(tp2):
    for rank, got in enumerate(tp2):
        y, g = got["reduce"]
        assert torch.equal(y, 2 * torch.arange(8.0).reshape(2, 4) + 100)
        assert torch.equal(g, torch.full((2, 4), rank + 1.0))


def test_scatter_keeps_own_chunk_and_gathers_backward(tp2):
    for rank, got in enumerate(tp2):
        y, g = got["scatter"]
        assert torch.equal(y, (torch.arange(8.0).reshape(2, 4) + 100 * rank)[:, 2 * rank:2 * rank + 2])
        assert torch.equal(g, torch.tensor([[1.0, 1, 2, 2], [1, 1, 2, 2]]))


def test_gather_concatenates_last_dim_and_splits_backward(tp2):
    expected = torch.cat([torch.arange(8.0).reshape(2, 4), torch.arange(8.0).reshape(2, 4) + 100], 1)
    for rank, got in enumerate(tp2):
        y, g = got["gather"]
        assert torch.equal(y, expected)
        assert torch.equal(g, torch.full((2, 4), rank + 1.0))


def test_sequence_scatter_keeps_own_rows_and_gathers_backward(tp2):
    for rank, got in enumerate(tp2):
        y, g = got["sp_scatter"]
        assert torch.equal(y, (torch.arange(8.0).reshape(2, 4) + 100 * rank)[rank:rank + 1])
        assert torch.equal(g, torch.tensor([[1.0] * 4, [2.0] * 4]))


def test_sequence_gather_concatenates_rows_and_splits_backward(tp2):
    expected = torch.cat([torch.arange(8.0).reshape(2, 4), torch.arange(8.0).reshape(2, 4) + 100])
    for rank, got in enumerate(tp2):
        y, g = got["sp_gather"]
        assert torch.equal(y, expected)
        assert torch.equal(g, torch.full((2, 4), rank + 1.0))


def test_sequence_reduce_scatter_sums_own_rows_and_gathers_backward(tp2):
    for rank, got in enumerate(tp2):
        y, g = got["sp_reduce_scatter"]
        total = 2 * torch.arange(8.0).reshape(2, 4) + 100
        assert torch.equal(y, total[rank:rank + 1])
        assert torch.equal(g, torch.tensor([[1.0] * 4, [2.0] * 4]))


@pytest.mark.parametrize("bias", [(False, False, False, True), (True, True, True, False),
                                  True, False])
def test_column_groups_equal_one_linear(bias):
    tp = serial_state().tp
    with torch.device("meta"):
        layer = ColumnParallelLinear(8, (4, 4, 4, 12), tp, bias=bias)
    initialize_parameters(layer, seed=0, device="cpu")
    flags = [bias] * 4 if isinstance(bias, bool) else list(bias)
    full_bias = torch.zeros(24)
    if layer.bias is not None:
        torch.nn.init.normal_(layer.bias)
        mask = torch.cat([torch.full((n,), f) for n, f in zip((4, 4, 4, 12), flags)])
        full_bias[mask] = layer.bias.detach()                  # the serial bias, by hand
    weight = layer.weight.detach().clone().requires_grad_()
    ref_bias = full_bias.clone().requires_grad_()
    x = torch.randn(3, 2, 8, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    qkv, u = layer.forward_groups(x, [3, 1])
    ref = F.linear(x_ref, weight, ref_bias)
    torch.testing.assert_close(torch.cat([qkv, u], -1), ref)
    assert qkv.is_contiguous() and u.is_contiguous()
    g = torch.randn_like(ref)
    (torch.cat([qkv, u], -1) * g).sum().backward()
    (ref * g).sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad)
    torch.testing.assert_close(layer.weight.grad, weight.grad)
    if layer.bias is not None:
        torch.testing.assert_close(layer.bias.grad, ref_bias.grad[mask])


def test_row_groups_equal_one_linear():
    tp = serial_state().tp
    with torch.device("meta"):
        layer = RowParallelLinear((4, 12), 8, tp, bias=True)
    initialize_parameters(layer, seed=0, device="cpu")
    torch.nn.init.normal_(layer.bias)
    a = torch.randn(3, 2, 4, requires_grad=True)
    m = torch.randn(3, 2, 12, requires_grad=True)
    y = layer.forward_groups([a, m])
    torch.testing.assert_close(y, F.linear(torch.cat([a, m], -1), layer.weight, layer.bias))
    y.square().sum().backward()
    got = (a.grad.clone(), m.grad.clone(), layer.weight.grad.clone(), layer.bias.grad.clone())
    for t in (a, m, layer.weight, layer.bias):
        t.grad = None
    F.linear(torch.cat([a, m], -1), layer.weight, layer.bias).square().sum().backward()
    for g, t in zip(got, (a, m, layer.weight, layer.bias)):
        torch.testing.assert_close(g, t.grad)
