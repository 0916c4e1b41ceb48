"""The text layer: streamed deltas equal the full decode, never half a character, and stop
sequences end the text exactly before themselves without releasing text later taken back."""

import random

import pytest

from longvita.infer.detokenize import INCOMPLETE, Detokenizer, check_stop_sequences
from longvita.processing.tokens import load_tokenizer

TEXTS = [
    "Hello, world! The answer is 42.",
    "日本語のテキストと emoji 🎉🚀 mixed with ASCII.",
    "Ünïcödé àccénts, Ελληνικά, русский, עברית, 中文。",
    "  leading spaces\nnew lines\n\ttabs and 👩‍👩‍👧 family",
]


@pytest.fixture(scope="module")
def tokenizer(qwen2_tokenizer_dir):
    return load_tokenizer(qwen2_tokenizer_dir)


def stream(tokenizer, ids, stop=()):
    detok = Detokenizer(tokenizer, stop)
    deltas = []
    for token_id in ids:
        if detok.stopped:
            break
        deltas.append(detok.push(token_id))
    deltas.append(detok.finish())
    return detok, deltas


@pytest.mark.parametrize("text", TEXTS)
def test_deltas_concatenate_to_the_full_decode(tokenizer, text):
    ids = tokenizer.encode(text, add_special_tokens=False)
    _, deltas = stream(tokenizer, ids)
    assert "".join(deltas) == tokenizer.decode(ids, skip_special_tokens=True) == text
    assert not any(INCOMPLETE in delta for delta in deltas)


def test_multibyte_characters_split_over_tokens_come_whole(tokenizer):
    # byte-level BPE: an emoji and rare CJK characters take several tokens each
    ids = tokenizer.encode("🎉𠀋🚀", add_special_tokens=False)
    assert len(ids) > 3
    _, deltas = stream(tokenizer, ids)
    assert [d for d in deltas if d] == ["🎉", "𠀋", "🚀"]


def test_random_token_sequences_match_the_full_decode(tokenizer):
    rng = random.Random(0)
    for _ in range(50):
        ids = [rng.randrange(151643) for _ in range(rng.randrange(1, 40))]
        _, deltas = stream(tokenizer, ids)
        assert "".join(deltas) == tokenizer.decode(ids, skip_special_tokens=True)


def test_special_tokens_are_skipped(tokenizer):
    ids = tokenizer.encode("Hi<|im_end|> there", add_special_tokens=False)
    _, deltas = stream(tokenizer, ids)
    assert "".join(deltas) == "Hi there"


@pytest.mark.parametrize(
    ("text", "stop", "expected"),
    [
        ("The answer is 42. Question: next", ["Question:"], "The answer is 42. "),
        ("one two three four", ["three", "two"], "one "),  # the first one in the text wins
        ("no stop here at all", ["STOP"], "no stop here at all"),
        ("ends with a partial ST", ["STOP"], "ends with a partial ST"),  # released at the end
        ("STOP first", ["STOP"], ""),
        ("emoji 🎉 stop", ["🎉"], "emoji "),
    ],
)
def test_stop_sequences(tokenizer, text, stop, expected):
    ids = tokenizer.encode(text, add_special_tokens=False)
    detok, deltas = stream(tokenizer, ids, stop)
    assert "".join(deltas) == expected
    assert detok.stopped == any(s in text for s in stop)


def test_text_that_may_start_a_stop_sequence_is_held_then_released(tokenizer):
    detok = Detokenizer(tokenizer, ["<END>"])

    def push(piece):
        return "".join(detok.push(t) for t in tokenizer.encode(piece, add_special_tokens=False))

    assert push("value") == "value"
    assert push(" <EN") + push("D") == " "  # "<END" may still become "<END>": held
    assert push("ING ok") == "<ENDING ok"  # it did not: released
    assert detok.finish() == "" and not detok.stopped


def test_no_text_is_released_past_a_stop_sequence(tokenizer):
    ids = tokenizer.encode("abc STOP def", add_special_tokens=False)
    detok = Detokenizer(tokenizer, ["STOP"])
    released = []
    for token_id in ids:
        released.append(detok.push(token_id))
        if detok.stopped:
            break
    assert "".join(released) == "abc " and detok.finish() == ""
    with pytest.raises(RuntimeError, match="after a stop sequence"):
        detok.push(ids[-1])


@pytest.mark.parametrize("bad", [[""], [None], ["ok", 3]])
def test_bad_stop_sequences_are_refused(bad):
    with pytest.raises(ValueError, match=r"stop\[\d\]"):
        check_stop_sequences(bad)


def test_a_single_string_is_one_stop_sequence():
    assert check_stop_sequences("\n\n") == ("\n\n",)


def test_none_is_no_stop_sequence():
    assert check_stop_sequences(None) == ()


@pytest.mark.parametrize("stop", [" ", " t", "lo t"])
def test_a_stop_sequence_in_the_text_held_at_the_end_still_stops(tokenizer, stop):
    """The last token leaves an incomplete character (" t" + half of "á»"), so its text is held
    until the answer ends; what `finish` releases is cut at the stop sequence too."""
    ids = [*tokenizer.encode("hello", add_special_tokens=False), 46500]
    assert tokenizer.decode(ids).endswith(INCOMPLETE)
    detok, deltas = stream(tokenizer, ids, stop=[stop])
    assert detok.stopped and "".join(deltas) == "hello t"[: "hello t".find(stop)]


def test_the_stream_says_stop_sequence_when_the_last_text_completes_one(tokenizer):
    from longvita.infer.decode import Continuation
    from longvita.infer.request import SamplingParams

    ids = [*tokenizer.encode("hello", add_special_tokens=False), 46500]
    params = SamplingParams(max_new_tokens=len(ids))
    chosen = iter(ids)
    continuation = Continuation(
        lambda logits: next(chosen), params, (), text=Detokenizer(tokenizer, [" t"])
    )
    text = "".join(continuation.next(None).text for _ in ids) + continuation.tail
    assert text == "hello" and continuation.stop_reason == "stop_sequence"
