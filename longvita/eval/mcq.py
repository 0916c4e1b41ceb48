"""`longvita eval mcq`: multiple-choice questions about images and videos from a local JSONL file.

The Video-MME / MVBench shape, one question per line (DESIGN.md):

    {"id": "q1", "question": "...", "options": ["...", "..."], "answer": "B",
     "category": "counting", "video": "clips/q1.mp4"}        # or "image"; or neither

Options are lettered A, B, C... in order (an option already written "B. text" keeps only its
text). Two scorings, each optional:
- letter: the model answers the Video-MME-style prompt (question, the options on lines
  "A. ...", "Answer with the option's letter from the given choices directly.") by greedy
  generation; the letter is extracted from the answer (`extract_letter`);
- likelihood: each option's text is scored as the answer to the bare question (media and
  question, no options: the cloze form) with `eval.likelihood`; the most likely option is the
  model's choice.
Malformed lines (bad JSON, missing or wrong fields, an answer letter past the options, a media
file that does not exist, a repeated id) are skipped, counted and reported as `file:line`; a
question the model cannot take (a prompt too long, an unreadable video) is skipped the same way.

Outputs in OUT: `answers.jsonl`, one record per answered question, written and flushed as each
is answered, which is also the resume cache (a rerun answers only questions it lacks, or whose
content or settings changed); `results.json` with the accuracies overall and per category.
Owns the file format, the prompts, the letter extraction, the cache and the report; the model is
reached through `McqModel` (a `HarnessModel`, or a stub in tests).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import string
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Protocol

from longvita.errors import MediaError, PromptError
from longvita.eval.harness import UserTurn, join_parts

logger = logging.getLogger(__name__)

LETTERS = string.ascii_uppercase
INSTRUCTION = "Answer with the option's letter from the given choices directly."
SCORINGS = ("both", "letter", "likelihood")
UNCATEGORIZED = "uncategorized"
ANSWERS_FILE = "answers.jsonl"
RESULTS_FILE = "results.json"
QUESTION_ERRORS = (PromptError, MediaError, ValueError, OSError)
"""What answering one question may raise that is the question's fault: it is skipped."""


@dataclass(frozen=True)
class Question:
    id: str
    question: str
    options: tuple[str, ...]
    """The options' texts, without letters."""
    answer: str
    """The right option's letter."""
    category: str
    media_kind: str | None
    """"image", "video" or None (a text-only question)."""
    media: str | None
    """The media file's resolved path."""
    where: str
    """file:line, for reports."""


@dataclass(frozen=True)
class Skipped:
    where: str
    reason: str


class McqModel(Protocol):
    """What the evaluation needs from a model (`eval.harness.HarnessModel` has both)."""

    def generate(self, turn: UserTurn, *, max_new_tokens: int):
        """An object whose `.text` is the answer."""
        ...

    def loglikelihood(self, turn: UserTurn, continuations: list[str]) -> list:
        """One object with a `.logprob` per continuation."""
        ...


# -- the file --------------------------------------------------------------------------------


def load_questions(path: Path, *, media_root: Path | None = None) -> tuple[list[Question], list]:
    """The well-formed questions of a JSONL file and the lines skipped (with why). Media paths
    are relative to `media_root` (default: the file's directory) unless absolute."""
    root = Path(media_root) if media_root is not None else path.parent
    questions: list[Question] = []
    skipped: list[Skipped] = []
    seen: set[str] = set()
    with open(path, encoding="utf-8", errors="replace") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                question = parse_question(line, where=where, media_root=root)
                if question.id in seen:
                    raise ValueError(f"id {question.id!r} already appears earlier in the file")
            except ValueError as err:
                skipped.append(Skipped(where, str(err)))
                continue
            seen.add(question.id)
            questions.append(question)
    return questions, skipped


def parse_question(line: str, *, where: str, media_root: Path) -> Question:
    """One line -> a Question; ValueError saying what is wrong with it."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as err:
        raise ValueError(f"not valid JSON ({err.msg} at column {err.colno})") from None
    if not isinstance(record, dict):
        raise ValueError(f"a line must be a JSON object, got {type(record).__name__}")
    qid = record.get("id")
    if isinstance(qid, bool) or not isinstance(qid, str | int) or qid == "":
        raise ValueError(f"'id' must be a non-empty string or an integer, got {qid!r}")
    text = record.get("question")
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"'question' must be a non-empty string, got {text!r}")
    options = _options(record.get("options"))
    answer = record.get("answer")
    if not isinstance(answer, str) or answer.strip().upper() not in LETTERS[: len(options)]:
        raise ValueError(
            f"'answer' must be one of the letters {', '.join(LETTERS[: len(options)])} "
            f"(one per option), got {answer!r}"
        )
    category = record.get("category")
    if category is not None and not isinstance(category, str):
        raise ValueError(f"'category' must be a string, got {category!r}")
    kind, media = _media(record, media_root)
    return Question(
        id=str(qid),
        question=text,
        options=options,
        answer=answer.strip().upper(),
        category=category or UNCATEGORIZED,
        media_kind=kind,
        media=media,
        where=where,
    )


def _options(value: object) -> tuple[str, ...]:
    if not isinstance(value, list) or not 2 <= len(value) <= len(LETTERS):
        raise ValueError(f"'options' must be a list of 2 to 26 strings, got {value!r}")
    texts = []
    for letter, option in zip(LETTERS, value, strict=False):
        if not isinstance(option, str) or not option.strip():
            raise ValueError(f"option {letter} must be a non-empty string, got {option!r}")
        texts.append(_strip_own_letter(option.strip(), letter))
    return tuple(texts)


def _strip_own_letter(option: str, letter: str) -> str:
    """ "B. text" (Video-MME writes its options so) -> "text" when B is the option's letter."""
    match = re.match(rf"^\(?{letter}[.):]\s*(\S.*)$", option, flags=re.DOTALL)
    return match.group(1) if match else option


def _media(record: dict, media_root: Path) -> tuple[str | None, str | None]:
    given = [kind for kind in ("image", "video") if record.get(kind) is not None]
    if len(given) > 1:
        raise ValueError("give 'image' or 'video', not both")
    if not given:
        return None, None
    kind = given[0]
    value = record[kind]
    if not isinstance(value, str) or not value:
        raise ValueError(f"'{kind}' must be a path, got {value!r}")
    path = Path(value) if os.path.isabs(value) else media_root / value
    if not path.exists():
        raise ValueError(f"{kind} file {path} does not exist (paths are relative to --media-root)")
    return kind, str(path)


# -- prompts and answers ---------------------------------------------------------------------


def letter_prompt(question: Question) -> UserTurn:
    """The Video-MME / MVBench prompt: media, question, lettered options, instruction."""
    lines = [question.question]
    lines += [f"{letter}. {text}" for letter, text in zip(LETTERS, question.options, strict=False)]
    lines.append(INSTRUCTION)
    return _turn(question, "\n".join(lines))


def cloze_prompt(question: Question) -> UserTurn:
    """The likelihood prompt: media and the question alone (the options are the answers)."""
    return _turn(question, question.question)


def _turn(question: Question, text: str) -> UserTurn:
    parts = [] if question.media_kind is None else [(question.media_kind, question.media)]
    return join_parts([*parts, ("text", text)])


_LEADING = re.compile(r"^[\s*_`\"'(\[]*([A-Z])(?=\s*$|[.,:;)\]*_`\"'])")
_STATED = re.compile(
    r"(?i:answer|option|choice)\s*(?i:is|:)?\s*(?i:option\s*)?[(\[]?([A-Z])(?![A-Za-z'])"
)
_ALONE = re.compile(r"(?<![A-Za-z'])([A-Z])(?![A-Za-z'])")
_ARTICLE_AFTER = re.compile(r"\s+[a-z]")


def extract_letter(response: str, options: Iterable[str]) -> str | None:
    """The option letter a free-form answer gives, or None.

    In order: a letter opening the answer ("B", "(B)", "B. text", "B) text", not "B or C"); a
    letter stated ("The answer is B", "Answer: (C)", "option D"); exactly one option letter
    standing alone in the answer; the answer equal to one option's text (case and surrounding
    punctuation ignored). An "A" followed by a lowercase word ("A red digit") is an article,
    not a letter.
    """
    options = list(options)
    valid = LETTERS[: len(options)]
    text = response.strip()

    def option_letter(match: re.Match | None) -> str | None:
        if match is None or match.group(1) not in valid:
            return None
        is_article = match.group(1) == "A" and _ARTICLE_AFTER.match(text, match.end())
        return None if is_article else match.group(1)

    found = option_letter(_LEADING.match(text)) or option_letter(_STATED.search(text))
    if found:
        return found
    alone = {option_letter(m) for m in _ALONE.finditer(text)} - {None}
    if len(alone) == 1:
        return alone.pop()
    normalized = _normalize(text)
    matches = [letter for letter, option in zip(valid, options, strict=True)
               if _normalize(option) == normalized]  # fmt: skip
    return matches[0] if len(matches) == 1 else None


def _normalize(text: str) -> str:
    return text.strip().strip(string.punctuation + " ").lower()


# -- the run ---------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class McqSettings:
    scoring: str = "both"
    """"letter", "likelihood" or "both"."""
    max_new_tokens: int = 16
    """Generated tokens per letter answer."""
    model_id: str = ""
    """What identifies the model and its video sampling in the cache (a changed one re-asks)."""

    def __post_init__(self) -> None:
        if self.scoring not in SCORINGS:
            raise ValueError(f"scoring must be one of {SCORINGS}, got {self.scoring!r}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")

    @property
    def letter(self) -> bool:
        return self.scoring in ("both", "letter")

    @property
    def likelihood(self) -> bool:
        return self.scoring in ("both", "likelihood")


def fingerprint(question: Question, settings: McqSettings) -> str:
    """What a cached answer was made from: the question's content and the model settings."""
    content = asdict(question)
    content.pop("where")
    content.update(model=settings.model_id, max_new_tokens=settings.max_new_tokens)
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()[:16]


def answer_question(model: McqModel, question: Question, settings: McqSettings, cached: dict):
    """The answer record of one question, reusing what `cached` (the same fingerprint) holds."""
    record = dict(cached)
    record.update(
        id=question.id, where=question.where, category=question.category, answer=question.answer
    )
    if settings.letter and "predicted" not in record:
        response = model.generate(letter_prompt(question), max_new_tokens=settings.max_new_tokens)
        predicted = extract_letter(response.text, question.options)
        record.update(
            response=response.text, predicted=predicted, correct=predicted == question.answer
        )
    if settings.likelihood and "likelihood_predicted" not in record:
        scores = model.loglikelihood(cloze_prompt(question), list(question.options))
        logprobs = [score.logprob for score in scores]
        best = max(range(len(logprobs)), key=logprobs.__getitem__)
        record.update(
            option_logprobs=logprobs,
            likelihood_predicted=LETTERS[best],
            likelihood_correct=LETTERS[best] == question.answer,
        )
    return record


class AnswerCache:
    """answers.jsonl: the last record of each question id; new records appended and flushed
    one whole line at a time (a line cut short by a crash is dropped on the next open)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.records: dict[str, dict] = {}
        if path.exists():
            self._load()
        self._file = open(path, "a", encoding="utf-8")  # noqa: SIM115 (closed by close())

    def _load(self) -> None:
        data = self.path.read_bytes()
        complete = data[: data.rfind(b"\n") + 1]
        if len(complete) != len(data):
            logger.warning("%s: dropping an incomplete last line (interrupted run)", self.path)
            with open(self.path, "r+b") as handle:
                handle.truncate(len(complete))
        for line in complete.decode("utf-8", errors="replace").splitlines():
            try:
                record = json.loads(line)
                self.records[str(record["id"])] = record
            except (json.JSONDecodeError, KeyError, TypeError):
                logger.warning("%s: ignoring an unreadable cached answer", self.path)

    def get(self, question: Question, key: str) -> dict:
        record = self.records.get(question.id)
        return record if record is not None and record.get("fingerprint") == key else {}

    def put(self, record: dict) -> None:
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        self.records[record["id"]] = record

    def close(self) -> None:
        self._file.close()


def run_mcq(
    model: McqModel,
    questions: list[Question],
    out: Path,
    settings: McqSettings,
    *,
    skipped: Sequence[Skipped] = (),
    progress: Callable[[Iterable], Iterable] | None = None,
) -> dict:
    """Answer every question (or take its cached answer), write answers.jsonl and
    results.json in `out`; returns the report (`from_cache`: the answers taken whole from an
    earlier run's answers.jsonl)."""
    out.mkdir(parents=True, exist_ok=True)
    cache = AnswerCache(out / ANSWERS_FILE)
    failed = list(skipped)
    records, from_cache = [], 0
    try:
        for question in progress(questions) if progress is not None else questions:
            key = fingerprint(question, settings)
            cached = cache.get(question, key)
            try:
                record = answer_question(model, question, settings, cached)
            except QUESTION_ERRORS as err:
                logger.warning("%s: skipped: %s", question.where, err)
                failed.append(Skipped(question.where, f"the model could not answer: {err}"))
                continue
            record["fingerprint"] = key
            if record != cached:
                cache.put(record)
            else:
                from_cache += 1
            records.append(record)
    finally:
        cache.close()
    report = summary(records, settings, failed)
    report["from_cache"] = from_cache
    (out / RESULTS_FILE).write_text(json.dumps(report, indent=2) + "\n")
    return report


def summary(records: list[dict], settings: McqSettings, skipped: list[Skipped]) -> dict:
    """results.json: accuracy (the letter scoring's, or the likelihood's when only that ran),
    both scorings' accuracies, the same per category, counts and the skipped lines."""
    categories = sorted({record["category"] for record in records})
    report = _accuracies(records, settings)
    report["by_category"] = {
        category: _accuracies([r for r in records if r["category"] == category], settings)
        for category in categories
    }
    report["skipped"] = len(skipped)
    report["skipped_lines"] = [asdict(s) for s in skipped]
    if settings.letter:
        report["no_letter"] = sum(r.get("predicted") is None for r in records)
    report["scoring"] = settings.scoring
    return report


def _accuracies(records: list[dict], settings: McqSettings) -> dict:
    n = len(records)

    def accuracy(field: str) -> float:
        return sum(r.get(field) == r["answer"] for r in records) / n if n else 0.0

    letter = accuracy("predicted") if settings.letter else None
    likelihood = accuracy("likelihood_predicted") if settings.likelihood else None
    return {
        "accuracy": letter if letter is not None else likelihood,
        "letter_accuracy": letter,
        "likelihood_accuracy": likelihood,
        "n": n,
    }
