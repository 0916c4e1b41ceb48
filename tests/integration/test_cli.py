"""The `longvita` command: --json output, escapes, and one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

import longvita
from longvita.cli import main, unescape


def test_unescape():
    assert unescape(r"<image>\nWhat?") == "<image>\nWhat?"
    assert unescape("a\nb") == "a\nb" and unescape(r"a\\n") == "a\\n"


def test_generate_json_matches_the_api(tiny_checkpoint, media, capsys):
    code = main(
        [
            "generate",
            "--model",
            str(tiny_checkpoint),
            "--prompt",
            r"<image>\nWhat is this?",
            "--image",
            str(media["image"]),
            "--max-new-tokens",
            "6",
            "--json",
        ]
    )
    assert code == 0
    record = json.loads(capsys.readouterr().out)
    api = longvita.load(tiny_checkpoint).generate(
        "<image>\nWhat is this?", images=[media["image"]], max_new_tokens=6
    )
    assert record["token_ids"] == api.token_ids and record["text"] == api.text
    assert record["prompt_tokens"] == api.prompt_tokens and record["num_tiles"] == api.num_tiles


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--image", "missing.png"], "missing.png"),
        ([], "1 <image> tag(s) but 0 image(s)"),
        (["--cp", "0"], "--cp must be >= 1"),
    ],
)
def test_user_errors_print_one_line_and_exit_2(tiny_checkpoint, capsys, extra, message):
    code = main(["generate", "--model", str(tiny_checkpoint), "--prompt", "<image>hi", *extra])
    err = capsys.readouterr().err
    assert code == 2 and message in err
    assert err.count("\n") == 1 and "Traceback" not in err


def test_console_script_bad_checkpoint(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "longvita.cli",
            "generate",
            "--model",
            str(tmp_path),
            "--prompt",
            "hi",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert "config.json" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.distributed
def test_generate_cp2_matches_cp1(tiny_checkpoint, media, capsys):
    common = ["generate", "--model", str(tiny_checkpoint), "--prompt", r"<image>\nWhat is this?",
              "--image", str(media["wide"]), "--max-new-tokens", "5", "--json"]  # fmt: skip
    assert main(common) == 0
    single = json.loads(capsys.readouterr().out)
    assert main([*common, "--cp", "2", "--prefill-chunk", "64"]) == 0
    sharded = json.loads(capsys.readouterr().out)
    assert sharded["token_ids"] == single["token_ids"]
    assert sharded["prompt_tokens"] == single["prompt_tokens"]
    assert sum(sharded["kv_cache_bytes_per_rank"]) <= single["kv_cache_bytes"] + 1024


def test_plan_command(tiny_checkpoint, capsys):
    assert main(["plan", "--model", str(tiny_checkpoint), "--frames", "16", "--json"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert record  # the plan's own tests check the numbers
