"""`eval mcq`: the file format and its malformed lines, letter extraction, scoring and resume on
a stub model with known answers, and the command end to end on the demo model."""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path

import pytest

import longvita
from longvita.cli import main
from longvita.data.synth import NEEDLE_QUESTION, Renderer, write_lossless_video
from longvita.eval.harness import HarnessModel
from longvita.eval.mcq import (
    INSTRUCTION,
    McqSettings,
    cloze_prompt,
    extract_letter,
    letter_prompt,
    load_questions,
    run_mcq,
)
from longvita.testing import write_jsonl

OPTIONS = ["red", "green", "blue", "yellow"]


@pytest.mark.parametrize(
    ("response", "letter"),
    [
        ("B", "B"),
        ("(B)", "B"),
        ("B. green", "B"),
        ("C) blue", "C"),
        (" d ", None),  # lowercase alone is not a letter
        ("The answer is B", "B"),
        ("The answer is (C).", "C"),
        ("Answer: D", "D"),
        ("I think option C is right", "C"),
        ("Best option:(A", "A"),
        ("A red square is shown, so the answer is D", "D"),
        ("A", "A"),
        ("A red square", None),  # an article, and not an option's text
        ("blue", "C"),  # the option's text
        ("Yellow.", "D"),
        ("E", None),  # past the options
        ("nothing useful", None),
        ("B or C", None),  # two letters
    ],
)
def test_extract_letter(response, letter):
    assert extract_letter(response, OPTIONS) == letter


def write_questions(path: Path, lines: list) -> Path:
    return write_jsonl(path, lines)


def test_malformed_lines_are_skipped_counted_and_located(tmp_path):
    (tmp_path / "a.png").write_bytes(b"not really a png, but it exists")
    good = {"id": "ok", "question": "Q?", "options": ["x", "y"], "answer": "B", "image": "a.png"}
    path = write_questions(
        tmp_path / "q.jsonl",
        [
            good,
            "{not json",
            {"id": "no-question", "options": ["x", "y"], "answer": "A"},
            {"id": "one-option", "question": "Q?", "options": ["x"], "answer": "A"},
            {"id": "past", "question": "Q?", "options": ["x", "y"], "answer": "C"},
            {"id": "lower", "question": "Q?", "options": ["x", "y"], "answer": "a"},
            {
                "id": "gone",
                "question": "Q?",
                "options": ["x", "y"],
                "answer": "A",
                "video": "v.mp4",
            },
            {**good, "id": "both", "video": "a.png"},
            good,  # a repeated id
            [1, 2],
            "",  # blank lines are not questions
        ],
    )
    questions, skipped = load_questions(path)
    assert [q.id for q in questions] == ["ok", "lower"]
    assert questions[0].media == str(tmp_path / "a.png") and questions[0].media_kind == "image"
    assert questions[1].answer == "A"
    assert [s.where for s in skipped] == [f"{path}:{n}" for n in (2, 3, 4, 5, 7, 8, 9, 10)]
    reasons = " | ".join(s.reason for s in skipped)
    for expected in ("not valid JSON", "'question'", "'options'", "letters A, B", "v.mp4",
                     "not both", "already appears", "JSON object"):  # fmt: skip
        assert expected in reasons


def test_prompts_letter_the_options_and_strip_their_own_letters(tmp_path):
    path = write_questions(
        tmp_path / "q.jsonl",
        [
            {
                "id": 1,
                "question": "Which?",
                "options": ["A. cat", "B. dog", "C) B. x"],
                "answer": "B",
            }
        ],  # fmt: skip
    )
    (question,), _ = load_questions(path)
    assert question.options == ("cat", "dog", "B. x")
    assert letter_prompt(question).text == f"Which?\nA. cat\nB. dog\nC. B. x\n{INSTRUCTION}"
    assert cloze_prompt(question).text == "Which?"


@dataclass
class Said:
    text: str


@dataclass
class Scored:
    logprob: float


class StubModel:
    """Says the letter it is told for each question text and likes the option it is told."""

    def __init__(self, letters: dict[str, str], liked: dict[str, str]) -> None:
        self.letters, self.liked = letters, liked
        self.calls = 0

    def generate(self, turn, *, max_new_tokens):
        self.calls += 1
        question = turn.text.split("\n")[0]
        if question == "broken":
            raise ValueError("cannot decode the video")
        return Said(f"The answer is {self.letters[question]}.")

    def loglikelihood(self, turn, continuations):
        self.calls += 1
        return [Scored(0.0 if c == self.liked[turn.text] else -5.0) for c in continuations]


def stub_file(tmp_path: Path) -> Path:
    lines = []
    for i in range(10):
        lines.append({"id": f"q{i}", "question": f"q{i}", "options": ["u", "v", "w"],
                      "answer": "B", "category": "even" if i % 2 == 0 else "odd"})  # fmt: skip
    lines.append({"id": "bad", "question": "bad", "options": ["u"], "answer": "A"})
    lines.append({"id": "broken", "question": "broken", "options": ["u", "v"], "answer": "A"})
    return write_questions(tmp_path / "q.jsonl", lines)


def stub_model() -> StubModel:
    # letters: right for q0..q5 (6 of 10); likelihood: right for q0..q8 except q1 (8 of 10)
    letters = {f"q{i}": "B" if i < 6 else "C" for i in range(10)}
    liked = {f"q{i}": "v" if i < 9 and i != 1 else "u" for i in range(10)}
    liked["broken"] = "u"
    return StubModel(letters, liked)


def test_accuracies_categories_skips_and_resume(tmp_path):
    path = stub_file(tmp_path)
    questions, skipped = load_questions(path)
    settings = McqSettings(model_id="stub")
    model = stub_model()
    report = run_mcq(model, questions, tmp_path / "out", settings, skipped=skipped)
    assert report["accuracy"] == report["letter_accuracy"] == 0.6
    assert report["likelihood_accuracy"] == 0.8
    assert report["n"] == 10 and report["from_cache"] == 0
    assert report["skipped"] == 2  # the malformed line and the question the model failed
    assert {s["where"] for s in report["skipped_lines"]} == {f"{path}:11", f"{path}:12"}
    assert report["by_category"]["even"] == {
        "accuracy": 0.6, "letter_accuracy": 0.6, "likelihood_accuracy": 1.0, "n": 5}  # fmt: skip
    assert report["by_category"]["odd"]["letter_accuracy"] == pytest.approx(0.6)
    assert report["by_category"]["odd"]["likelihood_accuracy"] == pytest.approx(0.6)
    assert json.loads((tmp_path / "out" / "results.json").read_text()) == report
    answers = [json.loads(x) for x in (tmp_path / "out" / "answers.jsonl").read_text().splitlines()]
    assert len(answers) == 10 and answers[0]["response"] == "The answer is B."
    assert answers[0]["correct"] and answers[0]["likelihood_correct"]

    again = stub_model()
    rerun = run_mcq(again, questions, tmp_path / "out", settings, skipped=skipped)
    assert rerun == {**report, "from_cache": 10}
    assert again.calls == 1  # only the question that failed is asked again


def test_resume_drops_a_cut_line_and_reasks_changed_questions(tmp_path):
    path = stub_file(tmp_path)
    questions, _ = load_questions(path)
    settings = McqSettings(model_id="stub", scoring="letter")
    run_mcq(stub_model(), questions, tmp_path / "out", settings)
    answers = tmp_path / "out" / "answers.jsonl"
    kept = answers.read_text().splitlines()[:7]
    answers.write_text("\n".join(kept) + '\n{"id": "q7", "resp')  # a run killed mid-line
    changed = [replace(q, question="q9") if q.id == "q0" else q for q in questions]
    model = stub_model()
    report = run_mcq(model, changed, tmp_path / "out", settings)
    assert model.calls == 1 + 3 + 1  # q0 changed, q7-q9 missing, "broken" fails again
    assert report["n"] == 10 and report["from_cache"] == 10 - 1 - 3
    assert report["likelihood_accuracy"] is None
    assert report["letter_accuracy"] == 0.5  # q0 now asks q9's question: answered C
    lines = answers.read_text().splitlines()
    assert all(json.loads(line) for line in lines)  # the cut line is gone


def test_settings_are_checked():
    with pytest.raises(ValueError, match="scoring"):
        McqSettings(scoring="vibes")


# -- the demo model ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def demo_questions(tmp_path_factory) -> Path:
    """Digit images and needle videos, options in shuffled places, one malformed line."""
    root = tmp_path_factory.mktemp("mcq")
    renderer = Renderer(11)
    lines = []
    for i, digit in enumerate("3850"):
        renderer.render(renderer.item("digit", digit)).save(root / f"d{i}.png")
        options = [d for d in "0123456789" if d != digit][i : i + 3]
        options.insert(i % 4, digit)
        lines.append({"id": f"img{i}", "question": "What digit is this?", "options": options,
                      "answer": "ABCD"[i % 4], "category": "image",
                      "image": f"d{i}.png"})  # fmt: skip
    for i, digit in enumerate("74"):
        frames = [renderer.render(renderer.item("letter")) for _ in range(5)]
        frames[2 * i + 1] = renderer.render(renderer.item("digit", digit))
        write_lossless_video(root / f"v{i}.mkv", frames)
        lines.append({"id": f"vid{i}", "question": NEEDLE_QUESTION, "options": ["1", digit, "9"],
                      "answer": "B", "category": "video", "video": f"v{i}.mkv"})  # fmt: skip
    lines.insert(3, {"id": "typo", "question": "What digit is this?", "options": ["1", "2"]})
    return write_questions(root / "questions.jsonl", lines)


def test_command_on_the_demo_model(demo_questions, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["eval", "mcq", str(demo_questions), "--model", "demo", "--out", str(out)]) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    report = json.loads((out / "results.json").read_text())
    assert printed["n"] == report["n"] == 6 and report["skipped"] == 1
    assert report["skipped_lines"][0]["where"] == f"{demo_questions}:4"
    assert report["likelihood_accuracy"] == 1.0  # the demo model knows its digits
    assert report["by_category"]["video"]["likelihood_accuracy"] == 1.0

    # the letter answers are Pipeline.generate's on the same prompt
    pipe = longvita.load(longvita.DEMO_MODEL)
    questions, _ = load_questions(demo_questions)
    answers = {json.loads(x)["id"]: json.loads(x) for x in (out / "answers.jsonl").open()}
    right = 0
    for question in questions:
        turn = letter_prompt(question)
        expected = pipe.generate(turn.text, images=turn.images, videos=turn.videos,
                                 max_new_tokens=16)  # fmt: skip
        assert answers[question.id]["response"] == expected.text
        right += extract_letter(expected.text, question.options) == question.answer
    assert report["letter_accuracy"] == right / 6

    # a rerun takes every answer from answers.jsonl, and says so
    before = (out / "answers.jsonl").read_text()
    assert main(["eval", "mcq", str(demo_questions), "--model", "demo", "--out", str(out)]) == 0
    assert (out / "answers.jsonl").read_text() == before
    assert json.loads((out / "results.json").read_text()) == {**report, "from_cache": 6}
    assert "6 of 6 answers came from an earlier run's answers.jsonl" in capsys.readouterr().err


def test_harness_model_refuses_bad_settings():
    with pytest.raises(ValueError, match="max_frames"):
        HarnessModel(object(), max_frames=0)
    with pytest.raises(ValueError, match="not both"):
        HarnessModel(object(), group=object())


def test_command_refuses_a_missing_file(tmp_path, capsys):
    code = main(["eval", "mcq", str(tmp_path / "none.jsonl"), "--model", "demo", "--out", "x"])
    assert code != 0 and "is not a file" in capsys.readouterr().err


@pytest.mark.parametrize("content", [b"", b'[{"question": "Q?"}]\n', b"\x00\x01binary"])
def test_a_file_without_a_question_is_an_error(tmp_path, capsys, content):
    path = tmp_path / "questions.jsonl"
    path.write_bytes(content)
    code = main(["eval", "mcq", str(path), "--model", "demo", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and "no well-formed question" in err and not (tmp_path / "o").exists()


def test_an_out_path_that_is_a_file_is_refused_before_the_work(tmp_path, capsys):
    (tmp_path / "taken").write_text("")
    for argv in (["mcq", str(tmp_path / "taken")], ["vniah", "--frames", "4"]):
        code = main(["eval", *argv, "--model", "demo", "--out", str(tmp_path / "taken")])
        assert code == 2 and "exists and is not a directory" in capsys.readouterr().err
