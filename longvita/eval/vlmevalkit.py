"""The VLMEvalKit adapter: a Long-VITA checkpoint as a VLMEvalKit model, without forking it.

VLMEvalKit has no plugin entry point: models are the `supported_VLM` table of
`vlmeval.config`. `register` adds `LongVITA` to it under a name, and this module's command
does that and then runs VLMEvalKit's own `run.py`, so every option of run.py works:

    python -m longvita.eval.vlmevalkit --run-py ~/VLMEvalKit/run.py --model-path DIR \\
        --max-num-frame 256 -- --data Video-MME MVBench --model longvita
    torchrun --nproc-per-node 8 -m longvita.eval.vlmevalkit ...      # data parallel, as run.py

`LongVITA` has the flags of the official wrapper (`vlmeval/vlm/long_vita.py`): INTERLEAVE and
VIDEO_LLM (VLMEvalKit then hands over video files, not frames), text, image and video parts;
and its generation settings: greedy, at most 1024 new tokens, `max_num_frame` frames per video
(4096 by default, the official Long-VITA-16K entry uses 128 and the 128K / 1M ones 256; the
MAX_NUM_FRAME environment variable overrides it, as there). With `official_prompts` (the
default) the message is what the official wrapper sends: parts joined with its tags (an image
`<image>\\n`, a video `<video>` without a newline, text as is), the question text with its
per-dataset instructions (`official_prompt`); the answer comes back as generated, as there
(the cut after "Answer:" is the Long-VITA repository's API-server wrapper's, not this one's);
without, parts are joined as `longvita serve` joins them (`eval.harness.join_parts`: a video
`<video>\\n`).

VLMEvalKit is not imported to use this module: `LongVITA` subclasses
`vlmeval.vlm.base.BaseModel` when VLMEvalKit is installed, otherwise `StandaloneBase`, which
has the same `generate(message, dataset)` entry; a dataset's type then comes from its name
(`dataset_type`).
"""

from __future__ import annotations

import argparse
import functools
import logging
import mimetypes
import os
import runpy
import sys

from longvita.eval.harness import (
    DEFAULT_MAX_NEW_TOKENS,
    HarnessModel,
    join_parts,
    launched_processes,
    rank_device,
)

logger = logging.getLogger(__name__)

DEFAULT_NAME = "longvita"
"""The name `run.py --model` takes after `register`."""
OFFICIAL_MAX_NUM_FRAME = 4096
OFFICIAL_TAGS = {"image": "<image>\n", "video": "<video>"}
"""How the official wrapper (`build_msgs`) joins media parts into the question."""


class StandaloneBase:
    """VLMEvalKit's model interface where VLMEvalKit is not installed: `generate(message,
    dataset)` takes what VLMEvalKit's does (a string, a {"type", "value"} dict, or a list of
    them; a string naming an existing file is an image or a video by its MIME type) and calls
    `generate_inner` with the list of dicts."""

    INTERLEAVE = False
    allowed_types = ["text", "image", "video"]

    def use_custom_prompt(self, dataset: str) -> bool:
        return False

    def generate(self, message, dataset: str | None = None) -> str:
        if isinstance(message, str | dict):
            message = [message]
        items = [m if isinstance(m, dict) else _part_of_string(m) for m in message]
        for item in items:
            if item.get("type") not in self.allowed_types or "value" not in item:
                raise ValueError(f"invalid message part {item!r}: expected {self.allowed_types}")
        return self.generate_inner(items, dataset)


def _part_of_string(value: str) -> dict:
    """A message string as VLMEvalKit reads it: a file path with an image or video MIME type
    is that medium, anything else text."""
    if isinstance(value, str) and os.path.isfile(value):
        kind = (mimetypes.guess_type(value)[0] or "").split("/")[0]
        if kind in ("image", "video"):
            return {"type": kind, "value": value}
    return {"type": "text", "value": value}


try:
    from vlmeval.vlm.base import BaseModel
except ModuleNotFoundError as err:
    if err.name is None or err.name.split(".")[0] != "vlmeval":
        raise  # VLMEvalKit is there but broken: say so
    BaseModel = StandaloneBase


class LongVITA(BaseModel):
    """A Long-VITA checkpoint as a VLMEvalKit model (see the module docstring)."""

    INTERLEAVE = True
    VIDEO_LLM = True
    allowed_types = ["text", "image", "video"]
    is_api = False

    def __init__(
        self,
        model_path: str = "demo",
        max_num_frame: int = OFFICIAL_MAX_NUM_FRAME,
        *,
        device: str | None = None,
        dtype: str | None = None,
        fps: float | None = None,
        cp: int = 1,
        max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
        official_prompts: bool = True,
    ) -> None:
        super().__init__()
        self.max_num_frame = int(os.environ.get("MAX_NUM_FRAME", max_num_frame))
        self.max_new_tokens = max_new_tokens
        self.official_prompts = official_prompts
        self.model = HarnessModel.load(
            model_path,
            device=rank_device(device or default_device()),
            dtype=dtype,
            max_frames=self.max_num_frame,
            fps=fps,
            cp=cp,
        )

    def generate_inner(self, message: list[dict], dataset: str | None = None) -> str:
        parts = ((item["type"], item["value"]) for item in message)
        if not self.official_prompts:
            turn = join_parts(parts)
            return self.model.generate(turn, max_new_tokens=self.max_new_tokens).text
        turn = join_parts(parts, OFFICIAL_TAGS)
        turn.text = official_prompt(turn.text, dataset)
        return self.model.generate(turn, max_new_tokens=self.max_new_tokens).text


def default_device() -> str:
    """The accelerator when there is one (the official wrapper runs on CUDA), else the CPU."""
    import torch

    if torch.accelerator.is_available():
        return torch.accelerator.current_accelerator().type
    return "cpu"


# -- the official wrapper's prompts ---------------------------------------------------------

_SINGLE_WORD = "Answer the question using a single word or phrase."
_SELECT = "Please select the correct answer from the options above."
_OCR = "\nAnswer this question using the text in the image directly without any other context."
_LETTER_DIRECTLY = "Answer with the option's letter from the given choices directly."
_MVBENCH_TAIL = "Only give the best option.Best option:("


def official_prompt(text: str, dataset: str | None) -> str:
    """The question text as the official wrapper rewrites it for `dataset` (its `build_msgs`):
    an instruction per dataset or dataset type (VLMEvalKit's DATASET_TYPE, when installed)."""
    text = text.replace("\nAnswer: ", "\n")
    if dataset == "OCRBench":  # the named datasets first, then by type: the wrapper's order
        return text + _OCR
    if dataset in ("MMMU_DEV_VAL", "MMMU_TEST", "MMStar"):
        return _replace_strip(text, _SELECT) + _LETTER_DIRECTLY
    if dataset == "MVBench":
        return text.replace(_MVBENCH_TAIL, "") + "Answer with the letter."
    if dataset == "MMVet":
        return text
    if dataset == "MathVista_MINI":
        return text + "\n" + _SINGLE_WORD
    kind = dataset_type(dataset)
    if kind == "Y/N":
        return _replace_strip(text, "Answer the question with Yes or No.") + "Answer yes or no."
    if kind == "MCQ":
        return _replace_strip(text, _SELECT) + "Answer with the letter."
    if kind == "VQA":
        return text
    if kind == "Video-MCQ":
        return text + "Offer a very short reply."
    return _replace_strip(text, _SINGLE_WORD) + _SINGLE_WORD


def _replace_strip(text: str, phrase: str) -> str:
    return text.replace(phrase, "").strip() + "\n"


_TYPES_BY_NAME = (  # (type, name fragments), first match wins: VLMEvalKit's own families
    ("Video-MCQ", ("video-mme", "videomme", "mvbench", "mlvu", "longvideobench", "tempcompass")),
    ("MCQ", ("mme-realworld", "mmbench", "seedbench", "ccbench", "mmmu", "scienceqa", "ai2d")),
    ("Y/N", ("mme", "hallusion", "pope", "amber")),
    ("VQA", ("ocrvqa", "textvqa", "chartqa", "mathvista", "docvqa", "infovqa", "llavabench",
             "mmvet", "ocrbench", "openended")),
)  # fmt: skip


def dataset_type(dataset: str | None) -> str | None:
    """VLMEvalKit's type of a dataset ("MCQ", "Y/N", "VQA", "Video-MCQ"...), None without a
    dataset. Without VLMEvalKit, from the name (`_TYPES_BY_NAME`; else "MCQ", VLMEvalKit's
    default for a dataset it does not know)."""
    if dataset is None:
        return None
    try:
        from vlmeval.dataset import DATASET_TYPE
    except ImportError:
        _warn_types_from_names()
        name = dataset.lower()
        return next((t for t, parts in _TYPES_BY_NAME if any(p in name for p in parts)), "MCQ")
    return DATASET_TYPE(dataset)


@functools.cache
def _warn_types_from_names() -> None:
    logger.warning("VLMEvalKit is not installed: dataset types are guessed from their names")


# -- registering and running ----------------------------------------------------------------


def register(name: str = DEFAULT_NAME, **model_kwargs) -> None:
    """Make `run.py --model NAME` build `LongVITA(**model_kwargs)`."""
    from vlmeval.config import supported_VLM

    supported_VLM[name] = functools.partial(LongVITA, **model_kwargs)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m longvita.eval.vlmevalkit",
        description="Register a Long-VITA checkpoint in VLMEvalKit and run its run.py with the "
        "arguments after --.",
        epilog="example: ... --run-py VLMEvalKit/run.py --model-path demo -- "
        "--data MVBench --model longvita",
    )
    parser.add_argument("--run-py", required=True, help="VLMEvalKit's run.py")
    parser.add_argument("--name", default=DEFAULT_NAME, help="the name run.py --model takes")
    parser.add_argument("--model-path", required=True, help="checkpoint directory, or demo")
    parser.add_argument("--max-num-frame", type=int, default=OFFICIAL_MAX_NUM_FRAME)
    parser.add_argument("--device", default=None, help="default: the accelerator, else cpu")
    parser.add_argument("--dtype", default=None, help="default: fp32 on CPU, bf16 on GPU")
    parser.add_argument("--cp", type=int, default=1, help="context-parallel ranks (default 1)")
    parser.add_argument("run_args", nargs=argparse.REMAINDER, help="-- then run.py's arguments")
    args = parser.parse_args(argv)
    if not os.path.isfile(args.run_py):
        parser.error(f"--run-py {args.run_py} is not a file: give VLMEvalKit's run.py")
    if args.cp > 1 and launched_processes() > 1:
        parser.error(
            f"--cp {args.cp} starts its own {args.cp} ranks: run it as one process, not under "
            "torchrun with several (each would start a group on the same devices)"
        )
    register(
        args.name,
        model_path=args.model_path,
        max_num_frame=args.max_num_frame,
        device=args.device,
        dtype=args.dtype,
        cp=args.cp,
    )
    run_args = args.run_args[1:] if args.run_args[:1] == ["--"] else args.run_args
    sys.argv = [args.run_py, *run_args]
    runpy.run_path(args.run_py, run_name="__main__")


if __name__ == "__main__":
    main()
