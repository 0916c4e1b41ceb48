"""What ships inside the package besides code: the demo model, and `--model demo`.

`DEMO_MODEL` is the directory of the model trained by the demo's four stages (`longvita demo
train`, docs/demo.md), in the official checkpoint layout; every command that takes `--model`
takes `demo` for it.
"""

from __future__ import annotations

from pathlib import Path

from longvita.errors import CheckpointError

DEMO_MODEL = Path(__file__).resolve().parent / "demo_model"
"""The trained demo model (config.json, model.safetensors, tokenizer files)."""
DEMO_NAME = "demo"


def resolve_model_dir(name: str | Path) -> Path:
    """A checkpoint directory from a `--model` value: `demo` is `DEMO_MODEL`."""
    if str(name) != DEMO_NAME:
        return Path(name).expanduser()
    if not (DEMO_MODEL / "config.json").is_file():
        raise CheckpointError(
            f"the demo model is not in this installation ({DEMO_MODEL}): train it with "
            "`longvita demo train` (or `make demo-train`)"
        )
    return DEMO_MODEL
