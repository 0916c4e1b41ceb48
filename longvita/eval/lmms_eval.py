"""The lmms-eval adapter: `--model longvita` in lmms-eval, without forking it.

    pip install 'longvita[lmms-eval]'
    python -m lmms_eval --model longvita \\
        --model_args pretrained=DIR,device=cuda,dtype=bfloat16,max_frames=256 --tasks videomme

lmms-eval finds the model through its plugin entry point (group `lmms_eval.models`, declared in
pyproject.toml, payload `manifest`). `LongVITA` is a "simple" lmms-eval model (a task's text
context and its `doc_to_visual` media), the kind every task type reaches, with
`Instance.args` laid out as lmms-eval builds them:

- generate_until: (context, gen_kwargs, doc_to_visual, doc_id, task, split); gen_kwargs
  `until` (stop strings), `max_new_tokens`, `do_sample` / `temperature`, `top_p`;
- loglikelihood: (context, continuation or doc_to_target, doc_to_visual, doc_id, task, split),
  or (context, continuation) without media. Returns (loss, is_greedy) with loss the mean
  negative log-likelihood per continuation token: lmms-eval's multiple_choice scoring takes
  the argmin of the first value, and its own models (llava, llava_onevision, longva, qwen_vl...)
  return the language-model loss there, whatever the base class's docstring says. The
  continuation is scored as the start of the assistant's answer, without the leading space of
  lmms-eval's target delimiter (`answer_text`). The requests of one document and context (a
  multiple-choice question's options) share one prefill (`eval.likelihood`);
- generate_until_multi_round: (context, gen_kwargs, doc_to_visual, doc_to_text, doc_id, task,
  split); round 0 answers the context, then `doc_to_text(doc, previous_output=, round_idx=,
  previous_round_info=)` gives each next round (visuals, context, terminal, outputs, info)
  until it says terminal; returns the list of the rounds' answers.

A context without `<image>`/`<video>` tags gets one tag per visual before its text, in order
(`eval.harness.join_parts`, as `longvita serve` joins content parts); a context with tags keeps
them where they are (interleaved tasks). PIL images and image paths are images; other paths
(files, frame directories) are videos. model_args: pretrained (a checkpoint directory or demo),
device, dtype, max_frames, fps, cp, max_new_tokens (when a task sets none).

Importing this module imports lmms-eval: it is loaded by lmms-eval itself.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from typing import Any

from lmms_eval.api import instance as lmms_instance
from lmms_eval.api.instance import Instance
from lmms_eval.api.model import lmms
from tqdm import tqdm

from longvita.eval.harness import (
    DEFAULT_MAX_NEW_TOKENS,
    HarnessModel,
    UserTurn,
    join_parts,
    media_kind,
    rank_device,
)
from longvita.processing.tokens import IMAGE_TAG, VIDEO_TAG

logger = logging.getLogger(__name__)

MODEL_ID = "longvita"
"""The name `--model` takes."""
MODEL_ARGS = ("pretrained", "device", "dtype", "max_frames", "fps", "cp", "max_new_tokens")


def manifest():
    """The entry point's payload: lmms-eval's registry record of this model."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id=MODEL_ID, simple_class_path=f"{__name__}.LongVITA")


class LongVITA(lmms):
    """A Long-VITA checkpoint as an lmms-eval model (see the module docstring)."""

    is_simple = True

    def __init__(
        self,
        pretrained: str = "demo",
        device: str | None = "cpu",
        dtype: str | None = None,
        max_frames: int | None = None,
        fps: float | None = None,
        cp: int = 1,
        max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
        batch_size: int | str | None = 1,
        max_batch_size: int | None = None,
        **unknown: Any,
    ) -> None:
        super().__init__()
        if unknown:
            raise ValueError(
                f"unknown model_args {sorted(unknown)} for --model {MODEL_ID}; "
                f"expected some of {list(MODEL_ARGS)}"
            )
        if str(batch_size) not in ("1", "auto") or max_batch_size not in (None, 1):
            logger.warning("batch_size=%s ignored: requests run one at a time", batch_size)
        self.max_new_tokens = max_new_tokens
        # lmms-eval <= 0.7.2 leaves these to the model (0.7.3 sets them): under accelerate
        # launch its padding and progress bars read them
        self._rank = int(os.environ.get("RANK", "0"))
        self._world_size = int(os.environ.get("WORLD_SIZE", "1"))
        self.model = HarnessModel.load(
            pretrained,
            device=rank_device(device or "cpu"),
            dtype=dtype,
            max_frames=max_frames,
            fps=fps,
            cp=cp,
        )

    @property
    def device(self):
        return self.model.pipe.device if self.model.pipe is not None else "cpu"

    @property
    def batch_size(self) -> int:
        return 1

    # -- the three request types ------------------------------------------------------------

    def generate_until(self, requests: list[Instance]) -> list[str]:
        answers = []
        for request in self._progress(requests, "generate_until"):
            context, gen_kwargs, doc_to_visual, doc_id, task, split = request.args
            visuals = doc_to_visual(self.task_dict[task][split][doc_id])
            answer = self._generate(build_turn(context, visuals), gen_kwargs)
            self.cache_hook.add_partial("generate_until", (context, gen_kwargs), answer)
            answers.append(answer)
        return answers

    def loglikelihood(self, requests: list[Instance]) -> list[tuple[float, bool]]:
        """(mean negative log-likelihood per continuation token, is_greedy) per request; one
        prefill per (context, document), its continuations scored together."""
        groups: dict[tuple, list[int]] = {}
        continuations: list[str] = []
        for i, request in enumerate(requests):
            context, continuation, visuals_of = self._likelihood_args(request.args)
            groups.setdefault((context, visuals_of), []).append(i)
            continuations.append(continuation)
        results: list = [None] * len(requests)
        for (context, visuals_of), members in self._progress(groups.items(), "loglikelihood"):
            turn = build_turn(context, visuals_of())
            scores = self.model.loglikelihood(turn, [continuations[i] for i in members])
            for i, score in zip(members, scores, strict=True):
                results[i] = as_response((-score.mean_logprob, score.is_greedy))
        return results

    def generate_until_multi_round(self, requests: list[Instance]) -> list[list[str]]:
        answers = []
        for request in self._progress(requests, "generate_until_multi_round"):
            context, gen_kwargs, doc_to_visual, doc_to_text, doc_id, task, split = request.args
            doc = self.task_dict[task][split][doc_id]
            answers.append(self._rounds(doc, context, doc_to_visual(doc), doc_to_text, gen_kwargs))
        return answers

    # -- helpers ----------------------------------------------------------------------------

    def _rounds(self, doc, context: str, visuals, doc_to_text: Callable, gen_kwargs: dict):
        outputs: list[str] = []
        info = None
        round_idx = 0
        while True:
            if round_idx > 0:
                visuals, context, terminal, outputs, info = doc_to_text(
                    doc, previous_output=outputs, round_idx=round_idx, previous_round_info=info
                )
                outputs = list(outputs or [])
                if terminal:
                    return outputs
            outputs.append(self._generate(build_turn(context, visuals), gen_kwargs))
            round_idx += 1

    def _generate(self, turn: UserTurn, gen_kwargs: dict) -> str:
        options = sampling_options(gen_kwargs, default_max_new_tokens=self.max_new_tokens)
        return self.model.generate(turn, **options).text

    def _likelihood_args(self, args: tuple) -> tuple[str, str, Callable[[], Any]]:
        """(context, continuation, a function giving the visuals); the unconditional requests
        of `acc_mutual_info` are (context, continuation) alone."""
        if len(args) == 2:
            return args[0], answer_text(args[1]), _no_visuals
        context, target, doc_to_visual, doc_id, task, split = args
        key = (task, split, doc_id)
        doc = self.task_dict[task][split][doc_id]
        continuation = target if isinstance(target, str) else target(doc)
        if not isinstance(continuation, str):
            raise ValueError(
                f"task {task}: the continuation to score must be a string, got {continuation!r}"
            )
        return context, answer_text(continuation), _VisualsOf(doc_to_visual, doc, key)

    def _progress(self, items, what: str):
        items = list(items)
        return tqdm(items, desc=f"longvita {what}", disable=self.rank != 0 or len(items) < 2)


def build_turn(context: str, visuals) -> UserTurn:
    """The user turn of a context and its visuals (see the module docstring)."""
    if visuals is None:
        visuals = []
    elif not isinstance(visuals, list | tuple):
        visuals = [visuals]
    parts = [(media_kind(v), v) for v in visuals]
    if IMAGE_TAG in context or VIDEO_TAG in context:  # the task placed its media itself
        return UserTurn(
            context,
            images=[v for kind, v in parts if kind == "image"],
            videos=[v for kind, v in parts if kind == "video"],
        )
    return join_parts([*parts, ("text", context)])


class ScoredPair(tuple):
    """(loss, is_greedy) as a GenerationResult's text: lmms-eval's response cache checks a
    response with `text.strip()` (`--use_cache` crashed on a bare pair); a pair always is a
    response."""

    def strip(self) -> ScoredPair:
        return self


def as_response(pair: tuple[float, bool]):
    """A (loss, is_greedy) pair as this lmms-eval's evaluator needs it. lmms-eval 0.7 passes
    every response through `unwrap_generation_output`, which turns a bare pair into its string
    (its own multiple_choice scoring then fails to unpack it); a `GenerationResult` holding the
    pair comes out as the pair. Checked on the installed version: a pair that survives is
    returned as is. (A cache hit of lmms-eval 0.7 comes back as a string whatever the model
    returned: its `--use_cache` cannot serve likelihood tasks.)"""
    unwrap = getattr(lmms_instance, "unwrap_generation_output", None)
    if unwrap is None or unwrap(pair)[0] == pair:
        return pair
    return lmms_instance.GenerationResult(text=ScoredPair(pair))


def answer_text(continuation: str) -> str:
    """The continuation as the start of the assistant's answer: without the one space lmms-eval
    puts before each choice (its `target_delimiter`, for plain-text contexts ending in a word);
    here the context ends with the assistant header, where an answer never starts with a
    space."""
    return (
        continuation[1:] if continuation.startswith(" ") and continuation.strip() else continuation
    )


def sampling_options(gen_kwargs: dict, *, default_max_new_tokens: int) -> dict[str, Any]:
    """lmms-eval's gen_kwargs as `HarnessModel.generate` options: greedy unless do_sample (or,
    without do_sample, a temperature above 0) and a temperature given is not 0 (greedy, as in
    vLLM and lmms-eval's own models); `until` as stop strings, empty ones skipped as lmms-eval's
    models skip them."""
    until = gen_kwargs.get("until") or ()
    stop: Sequence[str] = tuple(s for s in ((until,) if isinstance(until, str) else until) if s)
    temperature = float(gen_kwargs.get("temperature") or 0.0)
    sample = gen_kwargs.get("do_sample")
    if sample is None:
        sample = temperature > 0
    elif gen_kwargs.get("temperature") is not None and temperature == 0:
        sample = False
    if int(gen_kwargs.get("num_beams") or 1) > 1:
        logger.warning("num_beams=%s ignored: no beam search", gen_kwargs["num_beams"])
    return {
        "max_new_tokens": int(gen_kwargs.get("max_new_tokens") or default_max_new_tokens),
        "temperature": (temperature or 1.0) if sample else 0.0,
        "top_p": float(gen_kwargs.get("top_p") or 1.0) if sample else 1.0,
        "stop": stop,
    }


def _no_visuals() -> list:
    return []


class _VisualsOf:
    """A document's visuals, fetched when its group is scored; equal for the same document, so
    the options of one question fall into one group."""

    def __init__(self, doc_to_visual: Callable, doc, key: tuple) -> None:
        self.doc_to_visual, self.doc, self.key = doc_to_visual, doc, key

    def __call__(self):
        return self.doc_to_visual(self.doc)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _VisualsOf) and self.key == other.key

    def __hash__(self) -> int:
        return hash(self.key)
