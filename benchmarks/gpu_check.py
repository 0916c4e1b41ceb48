"""`make gpu-check`: what a lent GPU must confirm, in one run that fits one device command.

Parts, in this order (`--parts` picks some), each a subprocess with its own time limit, cut to
what is left of `--budget-s`; the summary is rewritten after each part, so a run stopped early
keeps what it measured:
1. `tests`: every test marked `gpu` (`pytest -m gpu`): the CUDA attention kernels forward and
   backward against fp32 math, the pipeline in fp32 (the CPU's tokens) and bf16, chunked prefill
   and cached decode against one forward, decode over a long cache without repeated K/V heads,
   a training step's gradients, NCCL process groups (and `generate_cp` over two GPUs if there
   are two), the server tests where fastapi and openai are installed.
2. `million_prefill` (issue 14): a 1M-token prefill of a Qwen2.5-7B-shaped random model with
   the int8 KV cache, `--million-layers` of its 28 layers run and the whole model scaled.
3. `long_context` (issues 5 and 14): `benchmarks/long_context.py` on CUDA in bf16, ours
   against transformers' Qwen2 with the same weights, at 8K-128K tokens (CP 2 with two GPUs).
4. `decode_pool` (issue 12): the server engine's decode step with and without the decode pool,
   1-32 sequences of the demo model, bf16 (seconds).
5. `train` (issue 10): `benchmarks/train_gpu.py`: memory and tokens/s of a training step
   against transformers in bf16, and the MFU of a 7B-shaped layer stack.
6. `serve` (issue 12): `benchmarks/serve.py` on CUDA in bf16, the demo and the 0.5B-shaped
   model, 1/8/32 clients, one repeat (needs fastapi and uvicorn: `make gpu-wheels` carries them).

Prints one JSON summary (versions, device, per part: exit status, seconds, its key figures);
with --out DIR also writes it there after every part, with each part's JSON and log.

    make gpu-check                     # on the GPU machine (README: "GPU check"), ~9 min
    python benchmarks/gpu_check.py --parts tests million_prefill --out /tmp/gpu
    python benchmarks/gpu_check.py --quick --out /tmp/gpu   # small sizes everywhere
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = ROOT / "benchmarks"
TESTED_TORCH = "2.13"
LONG_CONTEXT_ARGS = [  # the long-context benchmark's model at GPU lengths (bf16 added)
    "--lengths", "8192", "32768", "131072", "--peak-len", "32768",
    "--prefill-len", "32768", "--decode-len", "131072", "--repeats", "3", "--budget-gib", "8",
]  # fmt: skip
PART_LIMITS_S = {  # what each part may take at most (measured or estimated on an H200)
    "tests": 150, "million_prefill": 240, "long_context": 240, "decode_pool": 60,
    "train": 180, "serve": 240,
}  # fmt: skip


def environment() -> dict:
    device = torch.cuda.get_device_properties(0) if torch.cuda.is_available() else None
    return {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "torch_tested": torch.__version__.startswith(TESTED_TORCH),
        "gpus": torch.cuda.device_count(),
        "device": None if device is None else device.name,
        "device_memory_gib": None if device is None else round(device.total_memory / 2**30, 1),
    }


def run_tests(out: Path, limit_s: float) -> dict:
    junit = out / "gpu_tests.xml"
    command = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider",
               f"--junitxml={junit}", "tests"]  # fmt: skip
    done, seconds = run_limited(command, limit_s)
    (out / "gpu_tests.log").write_text(done.stdout + done.stderr)
    summary = {"exit_status": done.returncode, "seconds": seconds}
    if junit.is_file():
        suite = ET.parse(junit).getroot()
        suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
        for key in ("tests", "failures", "errors", "skipped"):
            summary[key] = int(suite.get(key, 0))
        summary["failed"] = [
            f"{case.get('classname')}::{case.get('name')}"
            for case in suite.iter("testcase")
            if case.find("failure") is not None or case.find("error") is not None
        ]
    else:
        summary["log_tail"] = (done.stdout + done.stderr)[-3000:]
    return summary


def run_limited(command: list[str], limit_s: float) -> tuple[subprocess.CompletedProcess, float]:
    """Run `command` from the repo root; past `limit_s` it is killed (exit status 124)."""
    start = time.perf_counter()
    try:
        done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=limit_s)
    except subprocess.TimeoutExpired as err:
        stdout = err.stdout.decode() if isinstance(err.stdout, bytes) else err.stdout or ""
        stderr = err.stderr.decode() if isinstance(err.stderr, bytes) else err.stderr or ""
        done = subprocess.CompletedProcess(command, 124, stdout, stderr + "\n[time limit]")
    return done, round(time.perf_counter() - start, 1)


def run_benchmark(out: Path, name: str, script: str, args: list[str], limit_s: float, keys):
    """A benchmark script's JSON report saved as NAME.json (its stderr as NAME.log); the
    summary keeps `keys(report)`."""
    command = [sys.executable, str(BENCHMARKS / script), *args]
    done, seconds = run_limited(command, limit_s)
    (out / f"{name}.log").write_text(done.stderr)
    summary = {"exit_status": done.returncode, "seconds": seconds, "command": " ".join(command[1:])}
    if done.returncode != 0:
        return {**summary, "log_tail": done.stderr[-3000:]}
    report = json.loads(done.stdout)
    (out / f"{name}.json").write_text(json.dumps(report, indent=2))
    return {**summary, **keys(report)}


def keeping(*keys: str):
    return lambda report: {key: report.get(key) for key in keys}


def benchmark_parts(quick: bool) -> dict:
    """name -> (script, arguments, the report's keys the summary keeps)."""
    two_gpus = torch.cuda.device_count() >= 2
    bf16 = ["--device", "cuda", "--dtype", "bfloat16"]
    long_context = [*bf16, *(["--quick"] if quick else LONG_CONTEXT_ARGS)]
    long_context += ["--cp", "1", "2"] if two_gpus else ["--cp"]
    million = ["--device", "cuda", "--layers", "2"] + (["--tokens", "65536"] if quick else [])
    return {
        "million_prefill": ("million_prefill.py", million,
                            keeping("measured", "scaled_to_full_model", "plan_full_model")),
        "long_context": ("long_context.py", long_context,
                         keeping("targets", "budget", "lengths", "cp")),
        "decode_pool": ("decode_pool.py", [*bf16, "--runs", "3"], keeping("steps")),
        "train": ("train_gpu.py", ["--quick"] if quick else [],
                  keeping("memory_and_speed", "mfu")),
        "serve": ("serve.py", [*bf16, "--repeats", "1"] + (["--quick"] if quick else []),
                  lambda report: {m: v["checks"] for m, v in report["models"].items()}),
    }  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="gpu_check_output", help="where to write (%(default)s)")
    parser.add_argument("--quick", action="store_true", help="the benchmarks' small sizes")
    parser.add_argument(
        "--parts", nargs="+", choices=list(PART_LIMITS_S), default=list(PART_LIMITS_S),
        help="which parts, in the order above (default: all)",
    )  # fmt: skip
    parser.add_argument(
        "--budget-s", type=float, default=570, help="all parts together (default 570 s)"
    )
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    summary = {"check": "gpu", "environment": environment(), "parts": args.parts}
    if not torch.cuda.is_available():
        summary["error"] = "no CUDA device is visible: nothing to check"
        print(json.dumps(summary, indent=2))
        return 1
    deadline = time.monotonic() + args.budget_s
    benchmarks = benchmark_parts(args.quick)
    failed = False
    for part in [p for p in PART_LIMITS_S if p in args.parts]:
        left = deadline - time.monotonic()
        if left < 20:
            summary[part] = {"skipped": f"{left:.0f} s of the budget left"}
            continue
        limit = min(PART_LIMITS_S[part], left)
        print(f"running {part} (at most {limit:.0f} s)", file=sys.stderr, flush=True)
        if part == "tests":
            summary[part] = run_tests(out, limit)
        else:
            script, script_args, keys = benchmarks[part]
            summary[part] = run_benchmark(out, part, script, script_args, limit, keys)
        failed |= summary[part].get("exit_status", 0) != 0
        (out / "gpu_check.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary, indent=2))
    return int(failed)


if __name__ == "__main__":
    sys.exit(main())
