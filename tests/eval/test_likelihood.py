"""The likelihood primitive against brute force (the whole sequence's logits, log_softmax) on a
tiny random model, and its choices on the demo model."""

from __future__ import annotations

import pytest
import torch

import longvita
from longvita.data.synth import Renderer
from longvita.errors import PromptError
from longvita.eval.likelihood import score_continuations


@pytest.fixture(scope="module")
def tiny_pipe(tiny_checkpoint):
    return longvita.load(tiny_checkpoint)


@pytest.fixture(scope="module")
def demo_pipe():
    return longvita.load(longvita.DEMO_MODEL)


def brute_force(pipe, messages, continuation: str, images=(), videos=()) -> tuple[float, bool]:
    """Prompt + continuation in one forward with logits at every position."""
    prompt = pipe.process(messages, list(images), list(videos))
    cont = torch.tensor(pipe.processor.tokenize(continuation))
    ids = torch.cat([prompt.input_ids, cont])  # [seq]
    mask = torch.cat([prompt.visual_mask, torch.zeros(len(cont), dtype=torch.bool)])
    with torch.no_grad():
        logits = pipe.model(
            ids[None],
            pixel_values=prompt.pixel_values if prompt.num_tiles else None,
            visual_mask=mask[None],
            logit_positions=torch.arange(ids.numel()),
        )[0]  # [seq, vocab]
    rows = logits[prompt.num_tokens - 1 : -1]  # [n, vocab]: the rows predicting the continuation
    logprobs = torch.log_softmax(rows.float(), dim=-1).gather(1, cont[:, None])[:, 0]
    return float(logprobs.sum()), bool((rows.argmax(-1) == cont).all())


def test_matches_brute_force_with_an_image_and_small_chunks(tiny_pipe, media):
    messages = "<image>\nWhat is in this image?"
    continuations = ["A red square", "a", "The quick brown fox jumps over the lazy dog."]
    scores = score_continuations(
        tiny_pipe, messages, continuations, images=[media["wide"]], prefill_chunk=5
    )
    assert [s.num_tokens for s in scores] == [
        len(tiny_pipe.processor.tokenize(c)) for c in continuations
    ]
    for score, text in zip(scores, continuations, strict=True):
        expected, greedy = brute_force(tiny_pipe, messages, text, images=[media["wide"]])
        torch.testing.assert_close(torch.tensor(score.logprob), torch.tensor(expected))  # fp32
        assert score.is_greedy == greedy
        assert score.mean_logprob == pytest.approx(score.logprob / score.num_tokens)


def test_the_order_of_continuations_does_not_matter(tiny_pipe, media):
    """Each continuation starts from the rewound cache: none sees another's tokens."""
    texts = ["Describe the video", "in detail", "What is"]
    forward = score_continuations(tiny_pipe, "<video>\nWhat?", texts, videos=[media["video"]])
    backward = score_continuations(
        tiny_pipe, "<video>\nWhat?", texts[::-1], videos=[media["video"]]
    )
    assert [s.logprob for s in forward] == pytest.approx([s.logprob for s in backward[::-1]])


def test_greedy_continuation_is_flagged(tiny_pipe):
    output = tiny_pipe.generate("What is in this image?", max_new_tokens=3)
    greedy_text = tiny_pipe.tokenizer.decode(output.token_ids)
    assert tiny_pipe.processor.tokenize(greedy_text) == output.token_ids  # decodes back the same
    other = tiny_pipe.tokenizer.decode([*output.token_ids[:2], output.token_ids[2] + 1])
    greedy, not_greedy = score_continuations(tiny_pipe, "What is in this image?",
                                             [greedy_text, other])  # fmt: skip
    assert greedy.is_greedy and not not_greedy.is_greedy
    assert greedy.logprob > not_greedy.logprob


def test_bad_continuations_are_refused(tiny_pipe):
    with pytest.raises(ValueError, match="non-empty list"):
        score_continuations(tiny_pipe, "hi", "a string, not a list")
    with pytest.raises(ValueError, match="no token"):
        score_continuations(tiny_pipe, "hi", ["ok", ""])


def test_too_long_for_the_positions_is_a_prompt_error(tiny_pipe):
    limit = tiny_pipe.config.max_position_embeddings
    with pytest.raises(PromptError, match="positions; use a shorter text$"):
        score_continuations(tiny_pipe, "hi", ["a " * (limit + 10)])


def test_demo_model_ranks_the_shown_digit_first(demo_pipe):
    renderer = Renderer(7)
    for digit in "2580":
        image = renderer.render(renderer.item("digit", digit))
        options = ["3", digit, "7"] if digit not in "37" else ["1", digit, "6"]
        scores = score_continuations(
            demo_pipe, "<image>\nWhat digit is this?", options, images=[image]
        )
        best = max(range(len(options)), key=lambda i: scores[i].logprob)
        assert options[best] == digit
        assert scores[1].is_greedy
