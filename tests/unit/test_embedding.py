"""`ops.embedding.embed`: the same values and gradients as `F.embedding`, without a second
vocab-sized gradient when the weight already has one."""

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from longvita.ops.embedding import embed


class NewTensorsOfAtLeast(TorchDispatchMode):
    """Counts the tensors of at least `numel` elements that aten ops allocate (not views, not
    in-place results)."""

    def __init__(self, numel: int) -> None:
        super().__init__()
        self.numel, self.count = numel, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        aliases = any(r.alias_info is not None for r in func._schema.returns)
        if not aliases:
            leaves = [t for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
            self.count += sum(t.numel() >= self.numel for t in leaves)
        return out


def tied_loss(lookup, weight, ids):
    hidden = lookup(ids, weight).tanh()  # [N, H]
    return (hidden @ weight.t()).logsumexp(-1).sum()  # the tied head


def grads(lookup, ids, *, steps=1, seed=0):
    torch.manual_seed(seed)
    weight = torch.nn.Parameter(torch.randn(50, 8))
    for _ in range(steps):
        tied_loss(lookup, weight, ids).backward()
    return weight.grad


def test_values_and_gradients_equal_f_embedding():
    ids = torch.tensor([[3, 7, 3, 49], [0, 7, 7, 1]])
    weight = torch.randn(50, 8)
    torch.testing.assert_close(embed(ids, weight), F.embedding(ids, weight))
    for steps in (1, 3):  # tied head first in backward; then accumulation over steps
        torch.testing.assert_close(
            grads(embed, ids, steps=steps), grads(F.embedding, ids, steps=steps)
        )


def test_untied_weight_gets_its_gradient_set():
    ids = torch.tensor([4, 4, 9])
    weight = torch.nn.Parameter(torch.randn(20, 3))
    embed(ids, weight).pow(2).sum().backward()
    expected = torch.zeros(20, 3)
    expected.index_add_(0, ids, 2 * weight.detach()[ids])
    torch.testing.assert_close(weight.grad, expected)


def test_no_second_vocab_sized_gradient_in_backward():
    ids = torch.randint(0, 4000, (8,))  # the [8, 4000] logits stay below the weight's size
    created = {}
    for lookup in (F.embedding, embed):
        weight = torch.nn.Parameter(torch.randn(4000, 16))
        loss = tied_loss(lookup, weight, ids)
        with NewTensorsOfAtLeast(weight.numel()) as seen:
            loss.backward()
        created[lookup] = seen.count
    assert created[F.embedding] >= 2  # the head's gradient and the lookup's dense one
    assert created[embed] == 1  # only the head's


def test_inference_and_frozen_weights_take_the_plain_path():
    ids = torch.tensor([1, 2])
    weight = torch.nn.Parameter(torch.randn(5, 2))
    with torch.no_grad():
        assert embed(ids, weight).grad_fn is None
    weight.requires_grad_(False)
    assert embed(ids, weight).grad_fn is None
