"""The lmms-eval adapter on the demo model: answers equal `Pipeline.generate`'s, likelihood
losses equal `eval.likelihood`'s and pick the shown digit, multi-round, the entry point's
manifest.

lmms-eval is an optional extra and pulls many packages, so where it is not installed the test
puts a small stand-in for the parts the adapter touches into sys.modules: `lmms_eval.api.model.
lmms` (rank, world_size, task_dict, cache_hook, as lmms-eval 0.7 defines them),
`lmms_eval.api.instance.Instance` (request_type, arguments, idx, metadata; `args`),
`GenerationResult` and `unwrap_generation_output` (which garbles a bare (logprob, is_greedy)
pair, as 0.7's does) and `lmms_eval.models.registry_v2.ModelManifest`. Where lmms-eval is
installed, the real ones are used (docs/evaluation.md says how this file was run against
lmms-eval 0.7.3).
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types
from dataclasses import dataclass, field

import pytest

import longvita
from longvita.data.synth import NEEDLE_QUESTION, Renderer
from longvita.eval.likelihood import score_continuations

REAL_LMMS_EVAL = importlib.util.find_spec("lmms_eval") is not None


def fake_lmms_eval() -> dict[str, types.ModuleType]:
    """Stand-ins with the signatures of lmms_eval 0.7's api.model, api.instance, registry_v2."""

    class CacheHook:
        def __init__(self, cachinglm=None) -> None:
            self.partials = []

        def add_partial(self, attr, req, res) -> None:
            self.partials.append((attr, req, res))

    class lmms:  # noqa: N801 (lmms-eval's name)
        is_simple = True

        def __init__(self) -> None:
            self._rank = 0
            self._world_size = 1
            self.cache_hook = CacheHook(None)
            self.task_dict = {}

        @property
        def rank(self):
            return self._rank

        @property
        def world_size(self):
            return self._world_size

    @dataclass
    class Instance:
        request_type: str
        arguments: tuple
        idx: int
        metadata: dict = field(default_factory=dict)
        resps: list = field(default_factory=list)

        @property
        def args(self):
            return self.arguments if isinstance(self.arguments, tuple) else (self.arguments,)

    @dataclass
    class GenerationResult:
        text: str
        token_counts: object = None

    def unwrap_generation_output(output):
        """lmms-eval 0.7's: what is not a str, a GenerationResult, (str, dict) or list[str]
        becomes its str, a (logprob, is_greedy) pair included."""
        if isinstance(output, GenerationResult):
            return output.text, output.token_counts
        if isinstance(output, str):
            return output, None
        if isinstance(output, tuple | list) and len(output) == 2 and isinstance(output[0], str):
            return output[0], None
        if isinstance(output, list) and all(isinstance(x, str) for x in output):
            return output, None
        return str(output), None

    @dataclass(frozen=True)
    class ModelManifest:
        model_id: str
        simple_class_path: str | None = None
        chat_class_path: str | None = None
        aliases: tuple = ()

    modules = {}
    for name in ("lmms_eval", "lmms_eval.api", "lmms_eval.models"):
        modules[name] = types.ModuleType(name)
    modules["lmms_eval.api.model"] = types.ModuleType("lmms_eval.api.model")
    modules["lmms_eval.api.model"].lmms = lmms
    modules["lmms_eval.api.instance"] = types.ModuleType("lmms_eval.api.instance")
    modules["lmms_eval.api.instance"].Instance = Instance
    modules["lmms_eval.api.instance"].GenerationResult = GenerationResult
    modules["lmms_eval.api.instance"].unwrap_generation_output = unwrap_generation_output
    modules["lmms_eval.models.registry_v2"] = types.ModuleType("lmms_eval.models.registry_v2")
    modules["lmms_eval.models.registry_v2"].ModelManifest = ModelManifest
    return modules


@pytest.fixture(scope="module")
def adapter():
    """The adapter module, imported against lmms-eval or its stand-in."""
    saved = {}
    if not REAL_LMMS_EVAL:
        for name, module in fake_lmms_eval().items():
            saved[name] = sys.modules.get(name)
            sys.modules[name] = module
    sys.modules.pop("longvita.eval.lmms_eval", None)
    try:
        yield importlib.import_module("longvita.eval.lmms_eval")
    finally:
        sys.modules.pop("longvita.eval.lmms_eval", None)
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module


@pytest.fixture(scope="module")
def model(adapter):
    return adapter.LongVITA(pretrained="demo", max_frames=8)


@pytest.fixture(scope="module")
def pipe():
    return longvita.load(longvita.DEMO_MODEL)


@pytest.fixture(scope="module")
def docs(tmp_path_factory):
    """A task's documents: digit images (PIL), a needle video (a file path), two images."""
    from longvita.data.synth import write_lossless_video

    root = tmp_path_factory.mktemp("lmms")
    renderer = Renderer(3)
    docs = []
    for digit in "4709":
        docs.append({"digit": digit, "visual": [renderer.render(renderer.item("digit", digit))]})
    frames = [renderer.render(renderer.item("letter")) for _ in range(6)]
    frames[4] = renderer.render(renderer.item("digit", "6"))
    video = write_lossless_video(root / "needle.mkv", frames)
    docs.append({"digit": "6", "visual": [str(video)]})
    docs.append(
        {"digit": "1", "visual": [renderer.render(renderer.item("digit", d)) for d in "18"]}
    )
    return docs


def instance(adapter, request_type: str, arguments: tuple, idx: int = 0):
    Instance = sys.modules["lmms_eval.api.instance"].Instance
    return Instance(
        request_type=request_type,
        arguments=arguments,
        idx=idx,
        metadata={"task": "digits", "doc_id": 0, "repeats": 1},
    )


def pair(response) -> tuple[float, bool]:
    """A loglikelihood response as lmms-eval's evaluator reads it."""
    unwrap = sys.modules["lmms_eval.api.instance"].unwrap_generation_output
    (logprob, is_greedy), _ = unwrap(response)
    return logprob, is_greedy


def visuals(doc):
    return doc["visual"]


def test_generate_until_equals_pipeline_generate(adapter, model, pipe, docs):
    model.task_dict = {"digits": {"test": docs}}
    contexts = ["What digit is this?"] * 4 + [NEEDLE_QUESTION]
    gen_kwargs = {"max_new_tokens": 6, "until": ["\n\n"], "do_sample": False}
    requests = [
        instance(adapter, "generate_until", (c, dict(gen_kwargs), visuals, i, "digits", "test"))
        for i, c in enumerate(contexts)
    ]
    answers = model.generate_until(requests)
    expected = [
        pipe.generate(f"<image>\n{c}", images=docs[i]["visual"], max_new_tokens=6).text
        for i, c in enumerate(contexts[:4])
    ]
    expected.append(
        pipe.generate(
            f"<video>\n{NEEDLE_QUESTION}", videos=docs[4]["visual"], max_new_tokens=6, max_frames=8
        ).text  # fmt: skip
    )
    assert answers == expected
    assert answers == ["4", "7", "0", "9", "6"]  # the demo model knows its digits
    assert REAL_LMMS_EVAL or model.cache_hook.partials  # the stand-in records them


def test_interleaved_context_keeps_its_tags(adapter, model, pipe, docs):
    model.task_dict = {"digits": {"test": docs}}
    context = "<image>\nWhat digit is this?\n<image>\nAnd this one?"
    request = instance(
        adapter, "generate_until", (context, {"max_new_tokens": 4}, visuals, 5, "digits", "test")
    )
    (answer,) = model.generate_until([request])
    assert answer == pipe.generate(context, images=docs[5]["visual"], max_new_tokens=4).text


def test_loglikelihood_scores_options_and_picks_the_digit(adapter, model, pipe, docs):
    model.task_dict = {"digits": {"test": docs}}
    options = [" 3", " 4", " 8"]  # lmms-eval puts its target delimiter before each choice
    requests = [
        instance(
            adapter, "loglikelihood", ("What digit is this?", o, visuals, 0, "digits", "test")
        )  # fmt: skip
        for o in options
    ]
    args = ("What digit is this?", "4", visuals, 0, "digits", "test")
    requests.append(instance(adapter, "loglikelihood", args))
    requests.append(instance(adapter, "loglikelihood", ("", "4")))  # acc_mutual_info's kind
    results = [pair(r) for r in model.loglikelihood(requests)]
    expected = score_continuations(  # the delimiter's space is not part of the answer
        pipe, "<image>\nWhat digit is this?", ["3", "4", "8", "4"], images=docs[0]["visual"]
    )
    # lmms-eval's convention: the mean negative log-likelihood per token (lower is better)
    assert [r[0] for r in results[:4]] == pytest.approx([-s.mean_logprob for s in expected])
    assert [r[1] for r in results[:4]] == [s.is_greedy for s in expected]
    assert results[3][1] is True  # "4" is what it would say
    assert min(range(3), key=lambda i: results[i][0]) == 1
    (unconditional,) = score_continuations(pipe, "", ["4"])
    assert results[4][0] == pytest.approx(-unconditional.mean_logprob)


def test_likelihood_responses_pass_the_response_cache_check(adapter, model, docs):
    """lmms-eval's ResponseCache keeps a response when `response.text.strip()` is truthy
    (`caching/response_cache.py`, `_is_valid_response`); a bare pair had no strip()."""
    model.task_dict = {"digits": {"test": docs}}
    args = ("What digit is this?", "4", visuals, 0, "digits", "test")
    (response,) = model.loglikelihood([instance(adapter, "loglikelihood", args)])
    assert bool(response.text and response.text.strip())
    assert pair(response)[1] is True


def test_rank_and_world_size_come_from_the_launch(adapter, monkeypatch):
    """lmms-eval <= 0.7.2 leaves them to the model (its padding and progress bars read them)."""
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(adapter.HarnessModel, "load", staticmethod(lambda *a, **k: None))
    launched = adapter.LongVITA(pretrained="demo")
    assert (launched.rank, launched.world_size) == (1, 2)


def test_loglikelihood_with_doc_to_target(adapter, model, docs):
    model.task_dict = {"digits": {"test": docs}}
    target = lambda doc: doc["digit"]  # noqa: E731
    requests = [
        instance(
            adapter, "loglikelihood", ("What digit is this?", target, visuals, i, "digits", "test")
        )  # fmt: skip
        for i in range(4)
    ]
    assert all(pair(r)[1] for r in model.loglikelihood(requests))


def test_multi_round(adapter, model, pipe, docs):
    model.task_dict = {"digits": {"test": docs}}
    seen = []

    def doc_to_text(doc, previous_output=None, round_idx=None, previous_round_info=None):
        seen.append((list(previous_output), round_idx, previous_round_info))
        if round_idx == 2:
            return None, None, True, previous_output, None
        return (
            docs[1]["visual"],
            "What digit is this?",
            False,
            previous_output,
            {"round": round_idx},
        )

    request = instance(
        adapter,
        "generate_until_multi_round",
        ("What digit is this?", {"max_new_tokens": 4}, visuals, doc_to_text, 0, "digits", "test"),
    )
    (rounds,) = model.generate_until_multi_round([request])
    assert rounds == ["4", "7"]
    assert seen == [(["4"], 1, None), (["4", "7"], 2, {"round": 1})]


def test_answer_text(adapter):
    assert adapter.answer_text(" B") == "B"
    assert adapter.answer_text("  two") == " two"
    assert adapter.answer_text(" ") == " "


def test_gen_kwargs(adapter):
    options = adapter.sampling_options
    greedy = options({"until": "\n", "temperature": 0.7, "do_sample": False},
                     default_max_new_tokens=9)  # fmt: skip
    assert greedy == {"max_new_tokens": 9, "temperature": 0.0, "top_p": 1.0, "stop": ("\n",)}
    sampled = options({"temperature": 0.5, "top_p": 0.9, "max_new_tokens": 3},
                      default_max_new_tokens=9)  # fmt: skip
    assert sampled == {"max_new_tokens": 3, "temperature": 0.5, "top_p": 0.9, "stop": ()}
    zero = options({"do_sample": True, "temperature": 0, "until": ["", "\n\n"]},
                   default_max_new_tokens=9)  # fmt: skip
    assert zero == {"max_new_tokens": 9, "temperature": 0.0, "top_p": 1.0, "stop": ("\n\n",)}
    assert options({"do_sample": True}, default_max_new_tokens=9)["temperature"] == 1.0


def test_model_args_and_manifest(adapter):
    with pytest.raises(ValueError, match="unknown model_args.*conv_template"):
        adapter.LongVITA(pretrained="demo", conv_template="qwen")
    manifest = adapter.manifest()
    assert manifest.model_id == "longvita"
    assert manifest.simple_class_path == "longvita.eval.lmms_eval.LongVITA"
    module, name = manifest.simple_class_path.rsplit(".", 1)
    assert getattr(importlib.import_module(module), name) is adapter.LongVITA


def test_entry_point_is_declared():
    import tomllib
    from pathlib import Path

    pyproject = tomllib.loads((Path(__file__).parents[2] / "pyproject.toml").read_text())
    group = pyproject["project"]["entry-points"]["lmms_eval.models"]
    assert group == {"longvita": "longvita.eval.lmms_eval:manifest"}
