"""The weights a training stage starts from: a stage file's `init:` section, in three modes.

    {llm: DIR, vision: DIR}          stage 1: a Hugging Face Qwen2 / Qwen2.5 checkpoint plus the
                                     public InternViT-300M-448px; the projector is random
    {from: DIR}                      stages 2-4: an export / official `Long-VITA-*_HF` directory
                                     (or a run directory: `longvita.train.checkpoint` loads those)
    {model: PRESET_OR_CONFIG,        toy runs: a random model (a `config.PRESETS` name or a
     tokenizer: DIR}                 Long-VITA config.json), the tokenizer from DIR

Owns the validation of that section (`InitSpec`), the translation of the Qwen2 and InternViT
configs into a `LongVITAConfig`, the random initializations (reproducible from a seed) and the
check that the tokenizer, with the 17 Long-VITA tokens, fits the embedding rows. Weights only:
no optimizer state, no step, no resuming (train.checkpoint), nothing about which parameters train
(the stage's `trainable:`), nothing distributed.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from longvita.config import CONFIG_FILE, PRESETS, LongVITAConfig, VisionConfig
from longvita.config import vision_config_from_dict as _vision_from_dict
from longvita.errors import CheckpointError
from longvita.model.checkpoint import expected_shapes, load_model, read_weights
from longvita.model.long_vita import LongVITAForCausalLM
from longvita.model.projector import VisionProjector
from longvita.processing.tokens import LONG_VITA_TOKENS, load_tokenizer
from longvita.runtime import dtype_name
from longvita.train.export import load_checkpoint_model
from longvita.train.run_dir import CHECKPOINTS as RUN_CHECKPOINTS
from longvita.train.run_dir import MANIFEST as RUN_MANIFEST

logger = logging.getLogger(__name__)

SOURCE_EXPORT = "export"
"""`InitSource.kind` of an export / official `Long-VITA-*_HF` directory."""
SOURCE_RUN = "run"
"""`InitSource.kind` of a training run directory (or one of its checkpoints)."""

QWEN2_MODEL_TYPE = "qwen2"
INTERN_VIT_MODEL_TYPE = "intern_vit_6b"
VISION_PREFIX = "model.vision_model."
PROJECTOR_PREFIX = "model.vision_projection."
LLM_INIT_STD = 0.02
"""Random LLM Linear / Embedding weights: N(0, 0.02), as Qwen2's `initializer_range`."""
PROJECTOR_INIT_STD = 0.01
"""Projector Linear weights: N(0, 0.01), the official `--init-method-std 0.01`."""
IGNORED_VISION_PREFIXES = ("clip_projector.",)
"""InternViT checkpoint keys that are not part of the encoder (InternVL-C's attention-pooling
head for CLIP-style training); skipped. Any other unknown key is an error."""
_HF_BOOKKEEPING = frozenset(
    {"architectures", "auto_map", "_name_or_path", "transformers_version", "model_type"}
    | {"torch_dtype", "dtype"}
)
"""Fields of a Hugging Face config.json that describe the file, not the model: not carried."""
_QWEN2_DROPPED = _HF_BOOKKEEPING | {"rope_parameters", "rope_scaling", "layer_types"}
_QWEN2_REQUIRED = (
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "vocab_size",
)
_QWEN2_DEFAULTS = {  # transformers' Qwen2Config defaults, for fields a config.json may omit
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": False,
    "max_position_embeddings": 32768,
    "head_dim": None,
}
_VISION_REQUIRED = (
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "image_size",
    "patch_size",
)

# -- the `init:` section -------------------------------------------------------------------

_SPEC_FIELDS = {
    "llm": "llm",
    "vision": "vision",
    "from": "from_",
    "model": "model",
    "tokenizer": "tokenizer",
}
_MODES = {"llm": "pretrained", "vision": "pretrained", "from": "from", "model": "random"}
_USAGE = "{llm, vision} (stage 1), {from} (stages 2-4) or {model, tokenizer} (random weights)"


@dataclass(frozen=True)
class InitSpec:
    """A stage's `init:` section, validated: exactly one of the three modes."""

    llm: str | None = None
    """Stage 1: a Hugging Face Qwen2 / Qwen2.5 directory (config, safetensors, tokenizer)."""
    vision: str | None = None
    """Stage 1: an InternViT-300M-448px directory (config.json, safetensors)."""
    from_: str | None = None
    """Stages 2-4 (key `from`): an export / official Long-VITA directory or a run directory."""
    model: str | None = None
    """Random weights: a `config.PRESETS` name ("tiny", "14b") or a Long-VITA config.json."""
    tokenizer: str | None = None
    """Random weights: the directory of the tokenizer files (required with `model`)."""

    def __post_init__(self) -> None:
        given = [key for key, attr in _SPEC_FIELDS.items() if getattr(self, attr) is not None]
        for key in given:
            value = getattr(self, _SPEC_FIELDS[key])
            if not isinstance(value, str) or not value:
                raise ValueError(f"init.{key}: must be a non-empty path string, got {value!r}")
        modes = sorted({_MODES[key] for key in given if key in _MODES})
        named = ", ".join(f"init.{key}" for key in given)
        if len(modes) > 1:
            raise ValueError(f"init: give exactly one of {_USAGE}; got {named}")
        if not modes and self.tokenizer is None:
            raise ValueError(f"init: give one of {_USAGE}; got nothing")
        if self.tokenizer is not None and self.model is None:
            raise ValueError(
                "init.tokenizer: only used with init.model (stage 1 takes the tokenizer of "
                "init.llm, init.from that of its directory)"
            )
        if (self.llm is None) != (self.vision is None):
            have, need = ("llm", "vision") if self.vision is None else ("vision", "llm")
            raise ValueError(f"init.{have}: needs init.{need} too (stage 1 takes both)")
        if self.model is not None and self.tokenizer is None:
            raise ValueError("init.model: needs init.tokenizer (a directory of tokenizer files)")

    @property
    def mode(self) -> str:
        """Which mode: "pretrained" (llm + vision), "from" or "random"."""
        key = next(k for k in _MODES if getattr(self, _SPEC_FIELDS[k]) is not None)
        return _MODES[key]

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, base_dir: str | Path | None = None) -> InitSpec:
        """From the YAML mapping (keys llm, vision, from, model, tokenizer). Relative paths are
        taken relative to `base_dir` when given (the stage file's directory); `~` is expanded.
        A preset name under `model` is kept as is."""
        if not isinstance(data, Mapping):
            raise ValueError(f"init: must be a mapping ({_USAGE}), got {data!r}")
        if unknown := sorted(set(data) - set(_SPEC_FIELDS)):
            raise ValueError(f"init: unknown key(s) {unknown}; expected {list(_SPEC_FIELDS)}")
        values = {}
        for key, value in data.items():
            if isinstance(value, os.PathLike):
                value = os.fspath(value)
            if isinstance(value, str) and value and not (key == "model" and value in PRESETS):
                path = Path(os.path.expanduser(value))
                value = str(path if base_dir is None else Path(base_dir) / path)
            values[_SPEC_FIELDS[key]] = value
        return cls(**values)

    def check_paths(self) -> None:
        """ValueError naming the key when a path does not exist or is not what it must be.
        Cheap (no file is read): run it before any process starts."""
        for key in ("llm", "vision"):
            directory = _existing_dir(key, getattr(self, key))
            if directory is not None and not (directory / CONFIG_FILE).is_file():
                raise ValueError(f"init.{key}: {directory} has no {CONFIG_FILE}")
        _existing_dir("from", self.from_)
        _existing_dir("tokenizer", self.tokenizer)
        if self.model is not None and self.model not in PRESETS and not Path(self.model).exists():
            raise ValueError(
                f"init.model: {self.model!r} is neither a preset ({', '.join(PRESETS)}) nor an "
                "existing config.json"
            )


def _existing_dir(key: str, value: str | None) -> Path | None:
    if value is None:
        return None
    path = Path(value)
    if not path.exists():
        raise ValueError(f"init.{key}: {value} does not exist")
    if not path.is_dir():
        raise ValueError(f"init.{key}: {value} is not a directory")
    return path


# -- entry point ---------------------------------------------------------------------------


def initialize(
    spec: InitSpec,
    *,
    seed: int,
    dtype: torch.dtype = torch.float32,
    max_position_embeddings: int | None = None,
    device: str | torch.device = "cpu",
) -> tuple[LongVITAForCausalLM, Any]:
    """The model (in train mode, every parameter on `device` in `dtype`, all requiring grad)
    and its tokenizer, as `spec` says. `seed` makes every random weight reproducible;
    `max_position_embeddings` overrides the checkpoint's (the longer context of a later stage).
    The config's `torch_dtype` is `dtype`."""
    if max_position_embeddings is not None and max_position_embeddings < 1:
        raise ValueError(f"max_position_embeddings must be >= 1, got {max_position_embeddings}")
    spec.check_paths()
    options = dict(dtype=dtype, device=device, max_position_embeddings=max_position_embeddings)
    if spec.mode == "pretrained":
        model, tokenizer = init_pretrained(spec.llm, spec.vision, seed=seed, **options)
    elif spec.mode == "from":
        model, tokenizer = init_from(spec.from_, **options)
    else:
        model, tokenizer = init_random(spec.model, spec.tokenizer, seed=seed, **options)
    return model.train(), tokenizer


def _for_run(
    config: LongVITAConfig, dtype: torch.dtype, max_position_embeddings: int | None
) -> LongVITAConfig:
    """`config` with torch_dtype = dtype and, when given, the longer max_position_embeddings."""
    changes: dict[str, Any] = {"torch_dtype": dtype_name(dtype)}
    if max_position_embeddings is not None:
        changes["max_position_embeddings"] = max_position_embeddings
    return dataclasses.replace(config, **changes)


def check_vocab_fits(tokenizer, config: LongVITAConfig, source: str | Path) -> None:
    """CheckpointError unless every token id has an embedding row."""
    if len(tokenizer) > config.vocab_size:
        raise CheckpointError(
            f"the tokenizer of {source} has {len(tokenizer)} tokens (with the "
            f"{len(LONG_VITA_TOKENS)} Long-VITA tokens) but the LLM has only "
            f"{config.vocab_size} embedding rows (vocab_size): its ids would not fit"
        )


# -- stage 1: Qwen2 + InternViT --------------------------------------------------------------


def init_pretrained(
    llm_dir: str | Path,
    vision_dir: str | Path,
    *,
    seed: int,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    max_position_embeddings: int | None = None,
) -> tuple[LongVITAForCausalLM, Any]:
    """A Qwen2 checkpoint's LLM, an InternViT checkpoint's encoder and a random projector.

    Built on the meta device; each tensor is assigned as it is read and cast, so the weights
    are never held twice. max_position_embeddings: None keeps the Qwen2 config's.
    """
    config = _for_run(stage1_config(llm_dir, vision_dir), dtype, max_position_embeddings)
    tokenizer = load_tokenizer(llm_dir)
    check_vocab_fits(tokenizer, config, llm_dir)
    with torch.device("meta"):
        model = LongVITAForCausalLM(config)
    expected = expected_shapes(model)
    llm_expected = {
        k: v for k, v in expected.items() if not k.startswith((VISION_PREFIX, PROJECTOR_PREFIX))
    }
    vision_expected = {
        k.removeprefix(VISION_PREFIX): v for k, v in expected.items() if k.startswith(VISION_PREFIX)
    }
    tied = config.tie_word_embeddings
    state = read_weights(
        llm_dir,
        llm_expected,
        ignore=lambda key: tied and key == "lm_head.weight",
        device=device,
        dtype=dtype,
    )
    state |= read_weights(
        vision_dir,
        vision_expected,
        prefix=VISION_PREFIX,
        ignore=lambda key: key.startswith(IGNORED_VISION_PREFIXES),
        device=device,
        dtype=dtype,
    )
    result = model.load_state_dict(state, strict=False, assign=True)
    unset = {k for k in result.missing_keys if not k.startswith(PROJECTOR_PREFIX)}
    assert unset <= ({"lm_head.weight"} if tied else set()), unset
    projector = model.model.vision_projection.to_empty(device=device)
    init_projector(projector, torch.Generator().manual_seed(seed))
    projector.to(dtype)
    model.tie_weights()
    logger.info("initialized from %s (LLM) and %s (ViT), random projector", llm_dir, vision_dir)
    return model, tokenizer


def stage1_config(
    llm_dir: str | Path, vision_dir: str | Path, *, torch_dtype: str = "float32"
) -> LongVITAConfig:
    """The LongVITAConfig of a Qwen2 checkpoint (LLM fields, max_position_embeddings and its
    other model fields as `extra`) and an InternViT checkpoint (`vision`)."""
    vision = read_vision_config(vision_dir)
    path = Path(llm_dir) / CONFIG_FILE
    data = _read_json(path)
    try:
        return LongVITAConfig(vision=vision, torch_dtype=torch_dtype, **qwen2_config_fields(data))
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"{path}: {err}") from None


def qwen2_config_fields(data: Mapping[str, Any]) -> dict[str, Any]:
    """The LongVITAConfig LLM fields of a Hugging Face Qwen2 config (transformers 4 or 5
    spelling: `rope_theta` or `rope_parameters`); its other model fields go into `extra`.
    ValueError for another model_type or what our decoder does not implement."""
    data = dict(data)
    _check_model_type(data, QWEN2_MODEL_TYPE, "a Qwen2 / Qwen2.5 checkpoint", _QWEN2_REQUIRED)
    if data.get("hidden_act", "silu") != "silu":
        raise ValueError(f"hidden_act={data['hidden_act']!r} is not supported (silu)")
    if data.get("use_sliding_window"):
        raise ValueError("use_sliding_window=true is not supported (full attention only)")
    fields = {k: data.get(k, default) for k, default in _QWEN2_DEFAULTS.items()}
    fields |= {k: data[k] for k in _QWEN2_REQUIRED}
    fields["num_key_value_heads"] = data.get("num_key_value_heads") or data["num_attention_heads"]
    fields["rope_theta"] = _rope_theta(data)
    known = {f.name for f in dataclasses.fields(LongVITAConfig)}
    fields["extra"] = {k: v for k, v in data.items() if k not in known | _QWEN2_DROPPED}
    return fields


def _rope_theta(data: Mapping[str, Any]) -> float:
    """RoPE base of a Qwen2 config; scaled RoPE (YaRN...) is refused: Long-VITA uses none."""
    parameters = data.get("rope_parameters") or {}
    scaling = data.get("rope_scaling") or {}
    for name, table in (("rope_parameters", parameters), ("rope_scaling", scaling)):
        rope_type = table.get("rope_type", table.get("type", "default"))
        if rope_type != "default":
            raise ValueError(f"{name} of type {rope_type!r} is not supported (plain RoPE only)")
    return float(data.get("rope_theta", parameters.get("rope_theta", 10000.0)))


def read_vision_config(directory: str | Path) -> VisionConfig:
    """The VisionConfig of an InternViT checkpoint's config.json (model_type intern_vit_6b)."""
    path = Path(directory) / CONFIG_FILE
    data = _read_json(path)
    try:
        return intern_vit_config(data)
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"{path}: {err}") from None


def intern_vit_config(data: Mapping[str, Any]) -> VisionConfig:
    """VisionConfig of a public InternViT config (same field names); model fields we do not
    use (num_channels, dropout...) go into `extra`, file bookkeeping is dropped."""
    what = "InternViT-300M-448px, architectures ['InternVisionModel']"
    _check_model_type(data, INTERN_VIT_MODEL_TYPE, what, _VISION_REQUIRED)
    if data.get("num_channels", 3) != 3:
        raise ValueError(f"num_channels={data['num_channels']} is not supported (3, RGB)")
    return _vision_from_dict({k: v for k, v in data.items() if k not in _HF_BOOKKEEPING})


def _check_model_type(
    data: Mapping[str, Any], model_type: str, what: str, required: tuple[str, ...]
) -> None:
    if data.get("model_type") != model_type:
        raise ValueError(
            f"model_type is {data.get('model_type')!r}; expected {model_type!r} ({what})"
        )
    if missing := [k for k in required if data.get(k) is None]:
        raise ValueError(f"missing field(s) {missing}")


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise CheckpointError(f"{path} not found")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path} is not valid JSON: {err}") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} is not a JSON object")
    return data


# -- stages 2-4: a Long-VITA checkpoint --------------------------------------------------------


@dataclass(frozen=True)
class InitSource:
    """What an `init.from` directory is."""

    kind: str
    """SOURCE_EXPORT (an export / official Long-VITA directory) or SOURCE_RUN."""
    path: Path


def resolve_init_source(path: str | Path) -> InitSource:
    """Tell a run directory (RUN_DIR/run.json + RUN_DIR/checkpoints/, or one of its
    checkpoints) from an export / official Long-VITA directory (config.json, model_type
    long_vita). CheckpointError for anything else, naming what was found."""
    path = Path(path)
    if _is_run_dir(path) or (path.parent.name == RUN_CHECKPOINTS and _is_run_dir(path.parents[1])):
        return InitSource(kind=SOURCE_RUN, path=path)
    config_path = path / CONFIG_FILE
    if not config_path.is_file():
        raise CheckpointError(
            f"{path} is neither a Long-VITA checkpoint (no {CONFIG_FILE}) nor a run directory "
            f"(no {RUN_MANIFEST} and {RUN_CHECKPOINTS}/)"
        )
    if _read_json(config_path).get("model_type") == QWEN2_MODEL_TYPE:
        raise CheckpointError(
            f"{config_path}: a Qwen2 checkpoint, not a Long-VITA one: start stage 1 from it "
            "with init: {llm: DIR, vision: INTERN_VIT_DIR}"
        )
    return InitSource(kind=SOURCE_EXPORT, path=path)


def _is_run_dir(path: Path) -> bool:
    return (path / RUN_MANIFEST).is_file() and (path / RUN_CHECKPOINTS).is_dir()


def init_from(
    directory: str | Path,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    max_position_embeddings: int | None = None,
) -> tuple[LongVITAForCausalLM, Any]:
    """The model and tokenizer of an export / official Long-VITA directory (`load_model`), or
    of a training run's latest complete checkpoint (or the `checkpoints/step-N` named): the
    weights only, as the official stages start (`--finetune --no-load-optim --no-load-rng`)."""
    source = resolve_init_source(directory)
    if source.kind == SOURCE_RUN:
        model, tokenizer, checkpoint = load_checkpoint_model(source.path)
        logger.info("weights of %s", checkpoint)
        config = _for_run(model.config, dtype, max_position_embeddings)
        model.config = model.model.config = config
        return model.to(device=device, dtype=dtype), tokenizer
    config = LongVITAConfig.from_pretrained(source.path)
    config = _for_run(config, dtype, max_position_embeddings)
    tokenizer = load_tokenizer(source.path)
    check_vocab_fits(tokenizer, config, source.path)
    model = load_model(source.path, device=device, dtype=dtype, config=config)
    return model, tokenizer


# -- random weights ----------------------------------------------------------------------------


def init_random(
    name: str,
    tokenizer_dir: str | Path,
    *,
    seed: int,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    max_position_embeddings: int | None = None,
) -> tuple[LongVITAForCausalLM, Any]:
    """A random model of a preset or config.json (`random_model`) and the tokenizer of
    `tokenizer_dir`."""
    config = _for_run(model_config(name), dtype, max_position_embeddings)
    tokenizer = load_tokenizer(tokenizer_dir)
    check_vocab_fits(tokenizer, config, tokenizer_dir)
    model = random_model(config, seed=seed).to(device=device, dtype=dtype)
    return model, tokenizer


def model_config(name: str) -> LongVITAConfig:
    """A `config.PRESETS` name, or a Long-VITA config.json (the file or its directory)."""
    if name in PRESETS:
        return PRESETS[name]()
    path = Path(name)
    if path.is_dir():
        return LongVITAConfig.from_pretrained(path)
    try:
        return LongVITAConfig.from_dict(_read_json(path))
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"{path}: {err}") from None


def random_model(config: LongVITAConfig, *, seed: int) -> LongVITAForCausalLM:
    """A random model on the CPU in float32, the same for the same seed: LLM Linear and
    Embedding weights N(0, 0.02), zero biases, unit norms; the ViT's own `reset_parameters`;
    the projector as `init_projector`. Does not touch the global random state."""
    with torch.device("meta"):
        model = LongVITAForCausalLM(config)
    model.to_empty(device="cpu")  # every tensor is written below
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        model.model.init_weights(std=LLM_INIT_STD, generator=generator)  # ViT redone below
        if not config.tie_word_embeddings:
            model.lm_head.weight.normal_(0.0, LLM_INIT_STD, generator=generator)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model.model.vision_model.reset_parameters()
    init_projector(model.model.vision_projection, generator)
    model.tie_weights()
    return model


@torch.no_grad()
def init_projector(projector: VisionProjector, generator: torch.Generator) -> None:
    """LayerNorm weight 1, bias 0; Linear weights N(0, PROJECTOR_INIT_STD), biases 0.

    Drawn in float32 on the CPU from `generator` and copied, so a seed gives the same
    projector on every device and in every dtype (up to the cast)."""
    for module in projector.modules():
        if isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Linear):
            weight = torch.randn(module.weight.shape, generator=generator) * PROJECTOR_INIT_STD
            module.weight.copy_(weight)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
