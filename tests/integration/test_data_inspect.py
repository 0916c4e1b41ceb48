"""`longvita data inspect`, called through argparse as the CLI wires it."""

from __future__ import annotations

import argparse
import json
import sys

import pytest

from longvita.data.inspect import add_parser
from longvita.testing import (
    conversation,
    make_image,
    write_jsonl,
    write_mixture,
    write_tiny_tokenizer,
)


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="longvita")
    add_parser(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(argv)


@pytest.fixture(scope="module")
def mixture(tmp_path_factory):
    root = tmp_path_factory.mktemp("inspect")
    make_image(root / "a.png", (96, 64))
    write_jsonl(
        root / "text.jsonl",
        [conversation(f"q {i}", "The fox." * (1 + i)) for i in range(6)] + ["{bad"],
    )
    write_jsonl(
        root / "img.jsonl",
        [conversation("<image>\nq", "A.", images=["a.png"])] * 3
        + [conversation("<image>\nq", "A.", images=["gone.png"])],
    )
    groups = {
        "text": {"data_paths": ["text.jsonl"]},
        "images": {"ratio": 0.5, "data_paths": ["img.jsonl"]},
        "off": {"ratio": 0, "data_paths": ["not/there.jsonl"]},
    }
    return write_mixture(root / "mix.yaml", groups), root


def test_json_report(mixture, tmp_path, capsys):
    path, root = mixture
    tokenizer = write_tiny_tokenizer(tmp_path / "tok")
    args = _parse(
        [
            "data",
            "inspect",
            str(path),
            "--seq-len",
            "4096",
            "--tokenizer",
            str(tokenizer),
            "--data-root",
            str(root),
            "--json",
            "--no-progress",
        ]
    )
    assert args.func(args) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["samples_read"] == 7 + 2  # images: int(4 * 0.5) = 2
    assert report["groups"]["text"] == {"files": 1, "records": 7, "selected": 7, "packed": 6}
    assert report["groups"]["images"]["selected"] == 2
    assert report["skipped"]["malformed_json"] == 1
    assert report["skip_examples"]["malformed_json"][0].startswith(f"{root / 'text.jsonl'}:7:")
    lengths = report["token_lengths"]
    assert lengths["p0"] <= lengths["p50"] <= lengths["p90"] <= lengths["p100"] < 4096
    assert 0 < report["packing_efficiency"] <= 1 and report["sequences"] >= 1


def test_text_report_with_model_and_progress_bar(mixture, tiny_checkpoint, capsys, monkeypatch):
    path, root = mixture
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    args = _parse(
        [
            "data",
            "inspect",
            str(path),
            "--seq-len",
            "256",
            "--model",
            str(tiny_checkpoint),
            "--data-root",
            str(root),
            "--max-samples",
            "4",
            "--packing",
            "cross_source",  # a stage file's spelling; cross-source works too
        ]
    )
    assert args.func(args) == 0
    out, err = capsys.readouterr()
    assert "token lengths of" in out and "packing (cross_source, seq_len 256)" in out
    assert "samples read: 4" in out and "inspect: 100%|" in err  # the tqdm bar, on stderr


@pytest.mark.parametrize(("terminal", "no_progress"), [(False, False), (True, True)])
def test_no_progress_bar_off_a_terminal_or_when_asked(
    mixture, tmp_path, capsys, monkeypatch, terminal, no_progress
):
    path, root = mixture
    monkeypatch.setattr(sys.stderr, "isatty", lambda: terminal)
    tokenizer = str(write_tiny_tokenizer(tmp_path / "tok"))
    argv = ["data", "inspect", str(path), "--seq-len", "256", "--tokenizer", tokenizer]
    argv += ["--data-root", str(root), "--max-samples", "2"]
    args = _parse(argv + (["--no-progress"] if no_progress else []))
    assert args.func(args) == 0
    out, err = capsys.readouterr()
    assert "samples read: 2" in out and "%|" not in err  # no tqdm bar


def test_garbage_is_reported_not_raised(tmp_path, capsys):
    lines = [
        conversation("q", "The fox."),
        '{"messages": [{"role": "user", "content": "caf\\udce9"}, '
        '{"role": "assistant", "content": "a"}]}',  # a JSON escape: a lone surrogate
        "[" * 100_000 + "]" * 100_000,
        conversation("What is <IMG_CONTEXT>?", "A."),
        conversation("q", "A </vid>."),
        '{"messages": ' + "7" * 5000 + "}",
    ]
    write_jsonl(tmp_path / "bad.jsonl", lines)
    (tmp_path / "bom.json").write_bytes(
        b"\xef\xbb\xbf" + json.dumps([conversation("r", "The dog.")] * 2).encode()
    )
    path = write_mixture(tmp_path / "m.yaml", {"g": {"data_paths": ["bad.jsonl", "bom.json"]}})
    tokenizer = str(write_tiny_tokenizer(tmp_path / "tok"))
    argv = ["data", "inspect", str(path), "--seq-len", "256", "--tokenizer", tokenizer]
    args = _parse([*argv, "--data-root", str(tmp_path), "--json"])
    assert args.func(args) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["samples_read"] == 8 and report["groups"]["g"]["packed"] == 3
    assert {k: v for k, v in report["skipped"].items() if v} == {
        "invalid_sample": 3,
        "malformed_json": 2,
    }
    examples = report["skip_examples"]
    assert sorted(e.split(": ")[0] for e in examples["invalid_sample"]) == [
        f"{tmp_path / 'bad.jsonl'}:{line}" for line in (2, 4, 5)
    ]
    assert "nested too deeply" in examples["malformed_json"][0]
    args = _parse([*argv, "--data-root", str(tmp_path)])
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert "samples read: 8, skipped: 5" in out and "invalid_sample: 3" in out


def test_help_explains(capsys):
    with pytest.raises(SystemExit):
        _parse(["data", "inspect", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "packing efficiency" in text and "--seq-len" in text and "--max-samples" in text


@pytest.mark.parametrize(
    ("extra", "match"),
    [
        (["--tokenizer", "/no/such/dir"], "is not a directory"),
        ([], "exactly one of --tokenizer DIR or --model DIR"),
        (["--fps", "0"], "--fps must be a finite number > 0, got 0.0"),
        (["--fps", "nan"], "--fps must be a finite number > 0, got nan"),
        (["--max-frames", "0"], "--max-frames must be >= 1, got 0"),
        (["--seed", "-1"], "--seed must be in"),
    ],
)
def test_bad_arguments_are_one_line_value_errors(mixture, extra, match):
    path, root = mixture
    args = _parse(
        ["data", "inspect", str(path), "--seq-len", "64", "--data-root", str(root), *extra]
    )
    with pytest.raises(ValueError, match=match) as err:
        args.func(args)
    assert "\n" not in str(err.value)


def test_missing_mixture_and_data_files(mixture, tmp_path):
    path, root = mixture
    tokenizer = str(write_tiny_tokenizer(tmp_path / "tok"))
    args = _parse(
        [
            "data",
            "inspect",
            str(tmp_path / "nope.yaml"),
            "--seq-len",
            "64",
            "--tokenizer",
            tokenizer,
        ]
    )
    with pytest.raises(ValueError, match="nope.yaml' does not exist"):
        args.func(args)
    args.mixture = str(tmp_path)
    with pytest.raises(ValueError, match="is a directory; expected a mixture YAML file"):
        args.func(args)
    args = _parse(
        [
            "data",
            "inspect",
            str(path),
            "--seq-len",
            "64",
            "--tokenizer",
            tokenizer,
            "--data-root",
            str(tmp_path),
        ]
    )
    with pytest.raises(ValueError, match="data file\\(s\\) not found"):
        args.func(args)
