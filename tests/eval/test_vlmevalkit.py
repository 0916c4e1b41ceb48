"""The VLMEvalKit adapter on the demo model with VLMEvalKit-style messages: answers equal
`Pipeline.generate`'s on the prompt the official wrapper would build; the base class when
VLMEvalKit is installed (a stand-in `vlmeval.vlm.base.BaseModel` here); registering in
`supported_VLM` and running a run.py."""

from __future__ import annotations

import importlib
import json
import sys
import types

import pytest

import longvita
from longvita.data.synth import NEEDLE_QUESTION, Renderer, write_lossless_video
from longvita.eval import vlmevalkit
from longvita.eval.vlmevalkit import LongVITA, official_prompt

SINGLE_WORD = "Answer the question using a single word or phrase."


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    root = tmp_path_factory.mktemp("vlmeval")
    renderer = Renderer(5)
    paths = {}
    for digit in "358":
        paths[digit] = root / f"{digit}.png"
        renderer.render(renderer.item("digit", digit)).save(paths[digit])
    frames = [renderer.render(renderer.item("letter")) for _ in range(12)]
    frames[9] = renderer.render(renderer.item("digit", "2"))
    paths["video"] = write_lossless_video(root / "needle.mkv", frames)
    return {k: str(v) for k, v in paths.items()}


@pytest.fixture(scope="module")
def model():
    return LongVITA("demo", max_num_frame=12, device="cpu")


@pytest.fixture(scope="module")
def pipe():
    return longvita.load(longvita.DEMO_MODEL)


def test_flags_and_defaults_are_the_official_wrappers(model):
    assert LongVITA.INTERLEAVE and LongVITA.VIDEO_LLM and not LongVITA.is_api
    assert set(LongVITA.allowed_types) == {"text", "image", "video"}
    assert model.max_new_tokens == 1024 and model.official_prompts
    assert model.model.max_frames == 12
    assert model.use_custom_prompt("MVBench") is False


def test_image_answers_equal_pipeline_generate(model, pipe, media):
    for digit in "358":
        message = [{"type": "image", "value": media[digit]},
                   {"type": "text", "value": "What digit is this?"}]  # fmt: skip
        prompt = f"<image>\nWhat digit is this?\n{SINGLE_WORD}"  # the official dataset=None rule
        expected = pipe.generate(prompt, images=[media[digit]], max_new_tokens=1024).text
        assert model.generate(message) == expected
        model.official_prompts = False
        try:
            plain = model.generate(message, dataset="MMVet")
        finally:
            model.official_prompts = True
        assert plain == pipe.generate("<image>\nWhat digit is this?", images=[media[digit]],
                                      max_new_tokens=1024).text  # fmt: skip
        assert plain == digit


def test_video_and_interleaved_messages(model, pipe, media):
    video = [{"type": "video", "value": media["video"]},
             {"type": "text", "value": NEEDLE_QUESTION}]  # fmt: skip
    expected = pipe.generate(f"<video>\n{NEEDLE_QUESTION}", videos=[media["video"]],
                             max_new_tokens=1024, max_frames=12).text  # fmt: skip
    assert model.generate(video, dataset="MMVet") == expected == "2"

    interleaved = [
        {"type": "text", "value": "First: "},
        {"type": "image", "value": media["3"]},
        {"type": "text", "value": "then: "},
        {"type": "image", "value": media["8"]},
        {"type": "text", "value": "What digit is this?"},
    ]
    prompt = "First: <image>\nthen: <image>\nWhat digit is this?"
    expected = pipe.generate(prompt, images=[media["3"], media["8"]], max_new_tokens=1024).text
    assert model.generate(interleaved, dataset="MMVet") == expected
    assert (
        model.generate("What digit is this?", dataset="MMVet")
        == pipe.generate("What digit is this?", max_new_tokens=1024).text
    )


def test_bad_parts_are_refused(model):
    with pytest.raises(ValueError, match="audio"):
        model.generate([{"type": "audio", "value": "a.wav"}])


def test_official_prompt_rules(monkeypatch):
    q = "Q?\nA. x\nB. y\n"
    assert official_prompt(q, "MVBench") == q + "Answer with the letter."
    assert official_prompt("Q? Only give the best option.Best option:(", "MVBench") == (
        "Q? Answer with the letter."
    )
    assert official_prompt(
        q + "Please select the correct answer from the options above.", "MMStar"
    ) == (  # fmt: skip
        "Q?\nA. x\nB. y\nAnswer with the option's letter from the given choices directly."
    )
    assert official_prompt("Q?", "MMVet") == "Q?"
    assert official_prompt("Q?", "MathVista_MINI") == f"Q?\n{SINGLE_WORD}"
    assert official_prompt(f"Q? {SINGLE_WORD}", None) == f"Q?\n{SINGLE_WORD}"
    assert official_prompt("Q?\nAnswer: ", "Video-MME").startswith("Q?\n")
    monkeypatch.setattr(vlmevalkit, "dataset_type", lambda dataset: "MCQ")
    assert official_prompt(q, "SEEDBench_IMG") == q + "Answer with the letter."
    monkeypatch.setattr(vlmevalkit, "dataset_type", lambda dataset: "Y/N")
    assert official_prompt("Is it? Answer the question with Yes or No.", "MME") == (
        "Is it?\nAnswer yes or no."
    )
    monkeypatch.setattr(vlmevalkit, "dataset_type", lambda dataset: "Video-MCQ")
    assert official_prompt("Q?", "Video-MME") == "Q?Offer a very short reply."


def test_the_wrappers_order_puts_named_datasets_before_types(monkeypatch):
    monkeypatch.setattr(vlmevalkit, "dataset_type", lambda dataset: "VQA")  # VLMEvalKit's type
    assert official_prompt("Q?", "MathVista_MINI") == f"Q?\n{SINGLE_WORD}"
    assert official_prompt("Q?", "TextVQA_VAL") == "Q?"


@pytest.mark.parametrize(
    ("dataset", "kind"),
    [("MMBench_DEV_EN", "MCQ"), ("SEEDBench_IMG", "MCQ"), ("MME-RealWorld", "MCQ"),
     ("MME", "Y/N"), ("HallusionBench", "Y/N"), ("Video-MME", "Video-MCQ"), ("MLVU", "Video-MCQ"),
     ("TextVQA_VAL", "VQA"), ("MyData_OpenEnded", "VQA"), ("my_custom_set", "MCQ"), (None, None)],
)  # fmt: skip
def test_dataset_types_from_names_without_vlmevalkit(dataset, kind):
    assert vlmevalkit.dataset_type(dataset) == kind


def test_messages_reach_the_model_as_the_official_wrapper_sends_them(model, monkeypatch, media):
    """Its tags (a video `<video>` without a newline), VLMEvalKit's message forms (a string
    naming a file is that medium, a lone dict one part), the answer as generated (VLMEvalKit's
    `vlmeval/vlm/long_vita.py` returns its output unchanged)."""
    sent = []

    def generate(turn, max_new_tokens):
        sent.append(turn)
        return types.SimpleNamespace(text="Let me see. Answer: B ")

    monkeypatch.setattr(model.model, "generate", generate)
    video = [{"type": "video", "value": media["video"]}, {"type": "text", "value": "Q?"}]
    assert model.generate(video, dataset="MMVet") == "Let me see. Answer: B "
    assert sent[-1].text == "<video>Q?" and sent[-1].videos == [media["video"]]
    model.generate([media["3"], "What digit is this?"], dataset="MMVet")
    assert sent[-1].text == "<image>\nWhat digit is this?" and sent[-1].images == [media["3"]]
    model.generate({"type": "text", "value": "Hi"}, dataset="MMVet")
    assert sent[-1].text == "Hi"
    model.official_prompts = False
    try:
        assert model.generate(video, dataset="MMVet") == "Let me see. Answer: B "
        assert sent[-1].text == "<video>\nQ?"  # as `longvita serve` joins parts
    finally:
        model.official_prompts = True


def test_max_num_frame_environment_overrides(monkeypatch):
    monkeypatch.setenv("MAX_NUM_FRAME", "5")
    assert LongVITA("demo", max_num_frame=64, device="cpu").model.max_frames == 5


def test_subclasses_vlmevalkit_base_model_when_installed(monkeypatch, media):
    calls = []

    class BaseModel:  # VLMEvalKit's, reduced to what the adapter relies on
        INTERLEAVE = False
        allowed_types = ["text", "image", "video"]

        def __init__(self):
            self.dump_image_func = None

        def generate(self, message, dataset=None):
            calls.append(dataset)
            for item in message:
                assert item["type"] in self.allowed_types
            return self.generate_inner(message, dataset)

    fake = {name: types.ModuleType(name) for name in ("vlmeval", "vlmeval.vlm", "vlmeval.vlm.base")}
    fake["vlmeval.vlm.base"].BaseModel = BaseModel
    for name, module in fake.items():
        monkeypatch.setitem(sys.modules, name, module)
    try:
        module = importlib.reload(vlmevalkit)
        assert issubclass(module.LongVITA, BaseModel)
        wrapped = module.LongVITA("demo", device="cpu", official_prompts=False)
        assert wrapped.dump_image_func is None
        message = [{"type": "image", "value": media["5"]},
                   {"type": "text", "value": "What digit is this?"}]  # fmt: skip
        assert wrapped.generate(message, dataset="MMVet") == "5"
        assert calls == ["MMVet"]
    finally:
        monkeypatch.undo()
        importlib.reload(vlmevalkit)
    assert vlmevalkit.BaseModel is vlmevalkit.StandaloneBase


def test_main_registers_and_runs_run_py(monkeypatch, tmp_path):
    config = types.ModuleType("vlmeval.config")
    config.supported_VLM = {}
    monkeypatch.setitem(sys.modules, "vlmeval", types.ModuleType("vlmeval"))
    monkeypatch.setitem(sys.modules, "vlmeval.config", config)
    report = tmp_path / "ran.json"
    run_py = tmp_path / "run.py"
    run_py.write_text(
        "import json, sys\n"
        "from vlmeval.config import supported_VLM\n"
        "if __name__ == '__main__':\n"
        "    build = supported_VLM['lv']\n"
        "    ran = {'argv': sys.argv[1:], 'kwargs': build.keywords}\n"
        f"    json.dump(ran, open({str(report)!r}, 'w'))\n"
    )
    monkeypatch.setattr(sys, "argv", sys.argv[:])
    options = ["--run-py", str(run_py), "--name", "lv", "--model-path", "demo"]
    vlmevalkit.main([*options, "--max-num-frame", "64", "--", "--data", "MVBench", "--model", "lv"])
    ran = json.loads(report.read_text())
    assert ran["argv"] == ["--data", "MVBench", "--model", "lv"]
    assert ran["kwargs"] == {"model_path": "demo", "max_num_frame": 64, "device": None,
                             "dtype": None, "cp": 1}  # fmt: skip
    assert config.supported_VLM["lv"].func is vlmevalkit.LongVITA
