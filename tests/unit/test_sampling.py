import pytest
import torch

from longvita.infer.request import SamplingParams
from longvita.ops.sampling import filter_top_k, filter_top_p, sample_next_token


def test_greedy_is_argmax():
    logits = torch.tensor([[0.1, 3.0, -1.0], [2.0, 0.0, 1.0]])
    assert sample_next_token(logits).tolist() == [1, 0]


def test_top_k_keeps_k_largest():
    logits = torch.tensor([[1.0, 4.0, 3.0, 2.0]])
    kept = filter_top_k(logits, 2)
    assert torch.isfinite(kept).tolist() == [[False, True, True, False]]
    assert torch.equal(filter_top_k(logits, 0), logits)


def test_top_p_keeps_smallest_set_reaching_mass():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    kept = filter_top_p(probs.log(), 0.7)  # 0.5 < 0.7, 0.5 + 0.3 >= 0.7: keep two
    assert torch.isfinite(kept).tolist() == [[True, True, False, False]]
    kept = filter_top_p(probs.log(), 0.01)  # the best token always stays
    assert torch.isfinite(kept).tolist() == [[True, False, False, False]]


def test_sampling_is_seeded_and_respects_filters():
    logits = torch.randn(1, 50, generator=torch.Generator().manual_seed(0))

    def draw(seed, **kw):
        gen = torch.Generator().manual_seed(seed)
        return [
            int(sample_next_token(logits, temperature=1.0, generator=gen, **kw)) for _ in range(30)
        ]

    assert draw(1) == draw(1)
    assert draw(1) != draw(2)
    top3 = set(torch.topk(logits[0], 3).indices.tolist())
    assert set(draw(3, top_k=3)) <= top3
    assert set(draw(4, top_k=1)) == {int(logits.argmax())}


@pytest.mark.parametrize(
    "kwargs",
    [
        {"max_new_tokens": 0},
        {"max_new_tokens": 2.5},
        {"max_new_tokens": True},
        {"temperature": -1.0},
        {"temperature": float("nan")},
        {"temperature": float("inf")},
        {"top_p": 0.0},
        {"top_p": float("nan")},
        {"top_k": -2},
        {"seed": "7"},
        {"seed": 2**64},
        {"seed": -(2**63) - 1},
    ],
)
def test_sampling_params_validate(kwargs):
    ((name, value),) = kwargs.items()
    with pytest.raises(ValueError, match=name):
        SamplingParams(**kwargs)


def test_a_tiny_temperature_is_the_argmax_not_nan():
    logits = torch.tensor([[0.5, 3.0, -1.0], [2.0, 2.0, 1.0]])
    generator = torch.Generator().manual_seed(0)
    tokens = sample_next_token(logits, temperature=1e-45, generator=generator)
    assert tokens[0] == 1 and tokens[1] in (0, 1)


def test_a_sampling_params_object_and_flat_options_combine():
    from longvita.infer.request import GenerationRequest

    base = SamplingParams(max_new_tokens=9, temperature=0.7, seed=3)
    request = GenerationRequest.create("hi", sampling=base, top_k=5)
    assert request.sampling == SamplingParams(max_new_tokens=9, temperature=0.7, seed=3, top_k=5)
    with pytest.raises(TypeError, match="sampling must be a SamplingParams, got dict"):
        GenerationRequest.create("hi", sampling={"temperature": 1.0})
