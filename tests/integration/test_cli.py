"""The `longvita` command: --json output, escapes, prompt files, one-line errors with their
exit statuses, Ctrl-C, and warnings through logging."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import longvita
from longvita.cli import main, unescape
from longvita.parallel.launch import RankFailedError


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
        (["--image", "missing.png"], "--image missing.png: no such file or directory"),
        (["--video", "gone/"], "--video gone/: no such file or directory"),
        ([], "1 <image> tag(s) but 0 image(s)"),
        (["--cp", "0"], "--cp must be >= 1"),
        (["--image", "x.png", "--device", "tpu9"], "unknown device 'tpu9'"),
        (["--image", "x.png", "--device", "meta"], "device 'meta' holds no data"),
        (["--image", "x.png", "--dtype", "float64"], "dtype 'float64' is not supported"),
        (["--image", "x.png", "--dtype", "int8"], "dtype 'int8' is not supported"),
        (["--image", "x.png", "--temperature", "nan"], "temperature must be a finite number"),
        (["--image", "x.png", "--temperature", "inf"], "temperature must be a finite number"),
        (["--image", "x.png", "--top-p", "nan"], "top_p must be a finite number"),
        (["--image", "x.png", "--fps", "inf"], "fps must be a finite number"),
        (["--image", "x.png", "--max-frames", "0"], "max_frames must be >= 1"),
        (["--image", "x.png", "--prefill-chunk", "0"], "prefill_chunk must be >= 1"),
    ],
)
def test_user_errors_print_one_line_and_exit_2(tiny_checkpoint, media, capsys, extra, message):
    extra = [str(media["image"]) if arg == "x.png" else arg for arg in extra]  # x.png: a real one
    code = main(["generate", "--model", str(tiny_checkpoint), "--prompt", "<image>hi", *extra])
    err = capsys.readouterr().err
    assert code == 2 and message in err
    assert err.count("\n") == 1 and "Traceback" not in err


@pytest.mark.skipif(torch.accelerator.is_available(), reason="checks a machine without one")
def test_a_device_this_machine_lacks_is_a_user_error(tiny_checkpoint, capsys):
    code = main(["generate", "--model", str(tiny_checkpoint), "--prompt", "hi", "--device", "cuda"])
    err = capsys.readouterr().err
    assert code == 2 and "device 'cuda' is not available" in err and err.count("\n") == 1


def test_reserved_tokens_in_the_prompt_are_named(tiny_checkpoint, capsys):
    code = main(["generate", "--model", str(tiny_checkpoint), "--prompt", "a <IMG_CONTEXT>"])
    err = capsys.readouterr().err
    assert code == 2 and "the text contains '<IMG_CONTEXT>'" in err


def _run_cli(*args: str | bytes, stdin: bytes | None = None, timeout: float = 120):
    """The console entry point in a fresh process: (exit status, stdout, stderr)."""
    done = subprocess.run(
        [sys.executable, "-m", "longvita", *args],
        input=stdin,
        capture_output=True,
        timeout=timeout,
    )
    return done.returncode, done.stdout.decode(), done.stderr.decode(errors="replace")


def test_invalid_utf8_in_the_prompt_is_a_user_error(tiny_checkpoint):
    code, _, err = _run_cli("generate", "--model", str(tiny_checkpoint), "--prompt", b"\xff hi")
    assert code == 2 and "--prompt is not valid UTF-8: byte(s) b'\\xff' at byte 0" in err
    assert "Traceback" not in err


def test_prompt_from_a_file_or_stdin_equals_the_argument(tiny_checkpoint, tmp_path, capsys):
    text = "Describe\na quiet morning. " * 300  # far longer than argv users would type
    prompt_file = tmp_path / "prompt.txt"
    prompt_file.write_text(text)
    base = ["generate", "--model", str(tiny_checkpoint), "--max-new-tokens", "4", "--json"]
    assert main([*base, "--prompt-file", str(prompt_file)]) == 0
    from_file = json.loads(capsys.readouterr().out)
    expected = longvita.load(tiny_checkpoint).generate(text, max_new_tokens=4)
    assert from_file["token_ids"] == expected.token_ids
    assert from_file["prompt_tokens"] == expected.prompt_tokens
    code, out, _ = _run_cli(*base, "--prompt-file", "-", stdin=text.encode())
    assert code == 0 and json.loads(out)["token_ids"] == expected.token_ids


@pytest.mark.parametrize(
    ("content", "message"),
    [(None, "No such file"), (b"caf\xe9", "is not valid UTF-8: byte b'\\xe9' at byte 3")],
)
def test_bad_prompt_files_are_user_errors(tiny_checkpoint, tmp_path, capsys, content, message):
    path = tmp_path / "prompt.txt"
    if content is not None:
        path.write_bytes(content)
    code = main(["generate", "--model", str(tiny_checkpoint), "--prompt-file", str(path)])
    err = capsys.readouterr().err
    assert code == 2 and message in err and err.count("\n") == 1


def test_version_and_python_dash_m():
    code, out, _ = _run_cli("--version")
    assert code == 0 and out.strip() == f"longvita {longvita.__version__}"


def test_verbose_is_accepted_after_the_subcommand(tiny_checkpoint, capsys):
    code = main(["generate", "-v", "--model", str(tiny_checkpoint), "--prompt", "hi",
                 "--max-new-tokens", "2"])  # fmt: skip
    assert code == 0
    assert main(["-v", "plan", "--model", str(tiny_checkpoint), "--json"]) == 0


def _fail_like_a_rank(*args, **kwargs):
    raise RankFailedError(
        "rank 1 of 2 failed (RuntimeError: boom); the other ranks were stopped",
        traceback="Traceback (most recent call last):\n  ...\nRuntimeError: boom",
    )


@pytest.mark.parametrize("verbose", [False, True])
def test_a_failed_rank_is_one_line_with_its_traceback_on_demand(
    tiny_checkpoint, capsys, monkeypatch, verbose
):
    monkeypatch.setattr("longvita.infer.cp_launch.generate_cp", _fail_like_a_rank)
    argv = ["generate", "--model", str(tiny_checkpoint), "--prompt", "hi", "--cp", "2"]
    code = main(["-v", *argv] if verbose else argv)
    err = capsys.readouterr().err
    assert code == 1
    assert "longvita generate: error: rank 1 of 2 failed (RuntimeError: boom)" in err
    assert ("Traceback" in err) == verbose


def test_a_missing_media_file_is_named_before_the_checkpoint_loads(tiny_checkpoint, monkeypatch):
    monkeypatch.setattr(longvita, "load", lambda *a, **k: pytest.fail("loaded the checkpoint"))
    code = main(["generate", "--model", str(tiny_checkpoint), "--prompt", "<image>hi",
                 "--image", "typo.png"])  # fmt: skip
    assert code == 2


@pytest.mark.distributed
def test_a_user_error_under_cp_is_one_line(tiny_checkpoint, tmp_path):
    """The rank that finds it says it; the others stop without a line of their own."""
    command = [
        sys.executable,
        "-m",
        "longvita",
        "generate",
        "--model",
        str(tiny_checkpoint),
        "--prompt",
        "<image>\nWhat?",
        "--image",
        str(tmp_path / "gone.png"),
        "--cp",
        "2",
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=180)  # fmt: skip
    assert done.returncode == 2 and "gone.png" in done.stderr
    assert done.stderr.count("\n") == 1, done.stderr


def _processes_in_group(pgid: int) -> list[int]:
    found = []
    for stat_file in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat_file.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":  # after "pid (comm)": state, ppid, pgrp
            found.append(int(stat_file.parent.name))
    return found


@pytest.mark.distributed
@pytest.mark.skipif(not Path("/proc").is_dir(), reason="reads /proc")
def test_ctrl_c_ends_every_rank_quietly_with_status_130(tiny_checkpoint):
    """SIGINT to the whole process group, as a terminal sends it, while the ranks start."""
    # up to 2,000 tokens: still generating when the signal comes
    command = [sys.executable, "-m", "longvita", "generate", "--model", str(tiny_checkpoint),
               "--prompt", "hi", "--cp", "2", "--max-new-tokens", "2000"]  # fmt: skip
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True
    )
    deadline = time.monotonic() + 60
    while len(_processes_in_group(process.pid)) < 3 and time.monotonic() < deadline:
        time.sleep(0.2)  # the parent and its two ranks
    assert len(_processes_in_group(process.pid)) >= 3, "the ranks never started"
    os.killpg(process.pid, signal.SIGINT)
    _, err = process.communicate(timeout=60)
    err = err.decode()
    assert process.returncode == 130, err
    assert "interrupted" in err and "Traceback" not in err and "KeyboardInterrupt" not in err
    deadline = time.monotonic() + 20  # exiting processes may take a moment to be reaped
    while _processes_in_group(process.pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _processes_in_group(process.pid) == []  # every rank ended


@pytest.mark.parametrize("verbose", [False, True])
def test_library_warnings_go_through_logging(verbose):
    script = (
        "import warnings\n"
        "from longvita.logs import configure_logging\n"
        f"configure_logging({verbose}, route_transformers=True)\n"
        "warnings.warn('py-warning-text')\n"
        "from transformers.utils import logging as hf\n"
        "hf.get_logger('transformers.x').warning('hf-warning-text')\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    if verbose:
        assert "WARNING py.warnings:" in done.stderr and "py-warning-text" in done.stderr
        assert "WARNING transformers.x: hf-warning-text" in done.stderr
    else:
        assert done.stderr == ""


def test_console_script_bad_checkpoint(tmp_path):
    code, _, err = _run_cli("generate", "--model", str(tmp_path), "--prompt", "hi")
    assert code == 2
    assert "config.json" in err and "Traceback" not in err


@pytest.mark.distributed
def test_generate_cp2_matches_cp1(tiny_checkpoint, media, capsys):
    common = ["generate", "--model", str(tiny_checkpoint), "--prompt", r"<image>\nWhat is this?",
              "--image", str(media["wide"]), "--max-new-tokens", "5", "--json"]  # fmt: skip
    assert main(common) == 0
    single = json.loads(capsys.readouterr().out)
    assert main([*common, "--cp", "2", "--prefill-chunk", "64"]) == 0
    sharded = json.loads(capsys.readouterr().out)
    assert sharded.keys() == single.keys()  # the same fields at any --cp
    assert sharded["token_ids"] == single["token_ids"]
    assert sharded["prompt_tokens"] == single["prompt_tokens"]
    assert sharded["cp"] == 2 and len(sharded["kv_cache_bytes_per_rank"]) == 2
    assert sharded["kv_cache_bytes"] <= single["kv_cache_bytes"] + 1024


def test_plan_command(tiny_checkpoint, capsys):
    assert main(["plan", "--model", str(tiny_checkpoint), "--frames", "16", "--json"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert record  # the plan's own tests check the numbers


def test_plan_refuses_counts_beside_prompt_tokens(tiny_checkpoint, capsys):
    command = ["plan", "--model", str(tiny_checkpoint), "--prompt-tokens", "100"]
    assert main([*command, "--frames", "16", "--text-tokens", "5"]) == 2
    assert "leave out --frames, --text-tokens" in capsys.readouterr().err
    assert main([*command, "--json"]) == 0


@pytest.mark.parametrize(
    ("argv", "prefix"),
    [
        (["eval", "vniah", "--model", "/no/such/dir", "--out", "o"], "longvita eval vniah: error"),
        (["data", "inspect", "/no/such.yaml", "--seq-len", "64"], "longvita data inspect: error"),
    ],
)
def test_errors_name_the_nested_command(argv, prefix, capsys):
    assert main(argv) == 2
    assert capsys.readouterr().err.startswith(prefix)
