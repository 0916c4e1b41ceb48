"""The small-batch linear path (`ops.linear`): the same function as `F.linear`, taken only where
it was measured to pay."""

import pytest
import torch
import torch.nn.functional as F

from longvita.ops.linear import (
    SMALL_BATCH_MIN_WEIGHT,
    SMALL_BATCH_ROWS,
    SmallBatchLinear,
    decode_linear,
    use_weight_left,
    weight_left_linear,
)

LARGE = (2048, 1024)  # out, in: 2,097,152 elements, the threshold


@pytest.mark.parametrize("rows", [1, 2, 4, 5, 33])
@pytest.mark.parametrize("bias", [True, False])
def test_equals_f_linear(rows, bias):
    torch.manual_seed(0)
    weight = torch.randn(*LARGE)
    b = torch.randn(LARGE[0]) if bias else None
    x = torch.randn(1, rows, LARGE[1])
    want = F.linear(x, weight, b)
    layer = SmallBatchLinear(LARGE[1], LARGE[0], bias=bias)
    with torch.no_grad():
        layer.weight.copy_(weight)
        if bias:
            layer.bias.copy_(b)
    with torch.inference_mode():
        for got in (weight_left_linear(x, weight, b), layer(x)):
            assert got.shape == want.shape == (1, rows, LARGE[0])
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)


def test_takes_the_weight_left_path_only_where_it_pays():
    weight = torch.empty(*LARGE)
    assert weight.numel() == SMALL_BATCH_MIN_WEIGHT
    low, high = SMALL_BATCH_ROWS
    with torch.inference_mode():
        assert use_weight_left(low, weight) and use_weight_left(high, weight)
        assert not use_weight_left(1, weight)  # a GEMV already
        assert not use_weight_left(high + 1, weight)
        assert not use_weight_left(low, torch.empty(LARGE[0], LARGE[1] - 1))  # small weight
    assert not use_weight_left(low, weight)  # autograd on: training keeps F.linear


def test_module_is_nn_linear_for_state_dicts_and_training():
    torch.manual_seed(0)
    layer = SmallBatchLinear(LARGE[1], LARGE[0])
    plain = torch.nn.Linear(LARGE[1], LARGE[0])
    plain.load_state_dict(layer.state_dict())
    x = torch.randn(4, LARGE[1], requires_grad=True)
    layer(x).sum().backward()
    grad = x.grad.clone()
    x.grad = None
    plain(x).sum().backward()
    assert torch.equal(grad, x.grad)  # training: exactly nn.Linear
    with torch.no_grad():
        torch.testing.assert_close(layer(x), plain(x), rtol=1e-5, atol=1e-4)


def test_decode_linear_is_plain_where_the_weight_is_small():
    assert type(decode_linear(LARGE[1], LARGE[0], bias=False)) is SmallBatchLinear
    assert type(decode_linear(LARGE[1] - 1, LARGE[0], bias=True)) is torch.nn.Linear
