import pytest
import torch
from torch.testing import assert_close

from longvita.ops.loss import IGNORE_INDEX, full_logits_loss, masked_lm_loss, shift_labels
from longvita.testing import LargestOutput

X = IGNORE_INDEX


def _inputs(num_rows, hidden_size, vocab_size, fraction, seed=0):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(num_rows, hidden_size, generator=gen)
    weight = torch.randn(vocab_size, hidden_size, generator=gen) * 0.5
    targets = torch.randint(0, vocab_size, (num_rows,), generator=gen)
    num_supervised = round(fraction * num_rows)
    keep = torch.randperm(num_rows, generator=gen)[:num_supervised]
    masked = torch.full_like(targets, IGNORE_INDEX)
    masked[keep] = targets[keep]
    return hidden, weight, masked


def _loss_and_grads(loss_fn, hidden, weight, targets, **kwargs):
    hidden = hidden.clone().requires_grad_(True)
    weight = weight.clone().requires_grad_(True)
    loss_sum, count = loss_fn(hidden, weight, targets, **kwargs)
    loss_sum.backward()
    return loss_sum.detach(), count, hidden.grad, weight.grad


def test_shift_labels_predicts_first_answer_token_and_span_ends():
    # Two supervised spans: [2:4) and [6:7). The prompt token before each span predicts its
    # first token; each span's end predicts the following (ignored) label; last is ignored.
    labels = torch.tensor([X, X, 11, 12, X, X, 13, X])
    targets = shift_labels(labels)
    assert targets.tolist() == [X, 11, 12, X, X, 13, X, X]
    batched = shift_labels(torch.stack([labels, labels.flip(0)]))  # [2, S]: shifts the last dim
    assert batched[0].tolist() == targets.tolist()
    assert batched[1].tolist() == [13, X, X, 12, 11, X, X, X]  # labels [X, 13, X, X, 12, 11, X, X]


def test_shift_labels_last_position_ignored_even_if_supervised():
    assert shift_labels(torch.tensor([5, 6, 7])).tolist() == [6, 7, X]


@pytest.mark.parametrize("fraction", [0.0, 0.01, 0.5, 1.0])
@pytest.mark.parametrize("chunk_size", [1, 7, 64, 1000])
def test_masked_loss_equals_full_logits(fraction, chunk_size):
    hidden, weight, targets = _inputs(200, 16, 53, fraction, seed=round(fraction * 100))
    got = _loss_and_grads(masked_lm_loss, hidden, weight, targets, chunk_size=chunk_size)
    want = _loss_and_grads(full_logits_loss, hidden, weight, targets)
    assert got[1].dtype == torch.int64 and got[1].dim() == 0
    assert got[1].item() == want[1].item() == round(fraction * 200)
    for got_tensor, want_tensor in zip(got[0:1] + got[2:], want[0:1] + want[2:], strict=True):
        assert_close(got_tensor, want_tensor)


def test_no_supervised_rows_gives_zero_loss_and_zero_grads():
    hidden, weight, _ = _inputs(10, 8, 11, 0.0)
    targets = torch.full((10,), IGNORE_INDEX)
    loss_sum, count, grad_hidden, grad_weight = _loss_and_grads(
        masked_lm_loss, hidden, weight, targets, chunk_size=4
    )
    assert loss_sum.item() == 0.0 and count.item() == 0
    assert torch.equal(grad_hidden, torch.zeros_like(hidden))
    assert torch.equal(grad_weight, torch.zeros_like(weight))


def test_grad_output_scales_gradients():
    hidden, weight, targets = _inputs(30, 8, 13, 0.5)
    hidden.requires_grad_(True)
    loss_sum, count = masked_lm_loss(hidden, weight, targets, chunk_size=4)
    (loss_sum / count).backward()
    mean_grad = hidden.grad.clone()
    hidden.grad = None
    full_sum, full_count = full_logits_loss(hidden, weight, targets)
    (full_sum / full_count).backward()
    assert_close(mean_grad, hidden.grad)


def test_bfloat16_matches_full_logits_and_keeps_dtypes():
    hidden, weight, targets = _inputs(64, 16, 41, 0.5)
    hidden, weight = hidden.bfloat16(), weight.bfloat16()
    got = _loss_and_grads(masked_lm_loss, hidden, weight, targets, chunk_size=8)
    want = _loss_and_grads(full_logits_loss, hidden, weight, targets)
    assert got[0].dtype == torch.float32
    assert got[2].dtype == got[3].dtype == torch.bfloat16
    assert_close(got[0], want[0])
    assert_close(got[2], want[2])
    assert_close(got[3], want[3], atol=0.05, rtol=0.02)  # fp32 vs bf16 accumulation order


@pytest.mark.parametrize("fraction", [0.5, 1.0])
def test_no_tensor_larger_than_a_chunk_of_logits(fraction):
    # N x H (the hidden gradient) and V x H (the weight gradient) stay below chunk x V here, so
    # the bound covers every tensor any op creates in forward and backward.
    num_rows, hidden_size, vocab_size, chunk_size = 512, 4, 101, 24
    hidden, weight, targets = _inputs(num_rows, hidden_size, vocab_size, fraction)
    bound = chunk_size * vocab_size
    assert num_rows * hidden_size < bound and vocab_size * hidden_size < bound
    with LargestOutput() as masked:
        _loss_and_grads(masked_lm_loss, hidden, weight, targets, chunk_size=chunk_size)
    with LargestOutput() as full:
        _loss_and_grads(full_logits_loss, hidden, weight, targets)
    assert masked.max_numel <= bound
    assert full.max_numel >= num_rows * vocab_size  # the instrument sees the [N, V] logits


@pytest.mark.parametrize(
    ("hidden_shape", "weight_shape", "targets_shape"),
    [((4, 8), (10, 7), (4,)), ((4, 8), (10, 8), (5,)), ((2, 4, 8), (10, 8), (8,))],
)
def test_bad_shapes_raise(hidden_shape, weight_shape, targets_shape):
    with pytest.raises(ValueError, match="hidden"):
        masked_lm_loss(
            torch.zeros(hidden_shape),
            torch.zeros(weight_shape),
            torch.zeros(targets_shape, dtype=torch.long),
        )


def test_bad_chunk_size_and_targets_raise():
    hidden, weight, targets = _inputs(4, 8, 10, 1.0)
    with pytest.raises(ValueError, match="chunk_size"):
        masked_lm_loss(hidden, weight, targets, chunk_size=0)
    with pytest.raises(ValueError, match=r"\[0, 10\)"):
        masked_lm_loss(hidden, weight, torch.tensor([0, 1, 10, X]))
