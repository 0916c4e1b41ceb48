"""`make gpu-check`: what a lent GPU must confirm, in one run of a few minutes.

1. Every test marked `gpu` (`pytest -m gpu`): the CUDA attention kernels forward and backward
   against fp32 math, the pipeline in fp32 (the CPU's tokens) and bf16, chunked prefill and
   cached decode against one forward, decode over a long cache without repeated K/V heads, a
   training step's gradients, NCCL process groups (and `generate_cp` over two GPUs if there
   are two).
2. `benchmarks/long_context.py` on CUDA in bf16, ours against transformers' Qwen2 with the
   same weights, at 8K-128K tokens (and CP 2 when two GPUs are visible).
3. `benchmarks/decode_pool.py` on CUDA in bf16: the server engine's decode step with and
   without the decode pool, 1-32 sequences of the demo model (seconds).

Prints one JSON summary (versions, device, test counts and failures, the benchmark's targets
and figures); with --out DIR also writes it, the JUnit report and both logs there.

    make gpu-check                     # on the GPU machine (README: "GPU check")
    python benchmarks/gpu_check.py --quick --out /tmp/gpu   # a smaller benchmark
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
TESTED_TORCH = "2.13"
BENCHMARK_ARGS = [  # the long-context benchmark's model at GPU lengths, bf16
    "--device", "cuda", "--dtype", "bfloat16",
    "--lengths", "8192", "32768", "131072", "--peak-len", "32768",
    "--prefill-len", "32768", "--decode-len", "131072", "--repeats", "3", "--budget-gib", "8",
]  # fmt: skip
QUICK_ARGS = ["--device", "cuda", "--dtype", "bfloat16", "--quick"]


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


def run_tests(out: Path) -> dict:
    junit = out / "gpu_tests.xml"
    command = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider",
               f"--junitxml={junit}", "tests"]  # fmt: skip
    start = time.perf_counter()
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    (out / "gpu_tests.log").write_text(done.stdout + done.stderr)
    summary = {"exit_status": done.returncode, "seconds": round(time.perf_counter() - start, 1)}
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


def run_benchmark(out: Path, quick: bool) -> dict:
    args = list(QUICK_ARGS if quick else BENCHMARK_ARGS)
    args += ["--cp", "1", "2"] if torch.cuda.device_count() >= 2 else ["--cp"]
    command = [sys.executable, str(ROOT / "benchmarks" / "long_context.py"), *args]
    start = time.perf_counter()
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    (out / "long_context.log").write_text(done.stderr)
    seconds = round(time.perf_counter() - start, 1)
    if done.returncode != 0:
        return {"exit_status": done.returncode, "seconds": seconds, "log_tail": done.stderr[-3000:]}
    report = json.loads(done.stdout)
    (out / "long_context.json").write_text(json.dumps(report, indent=2))
    return {"exit_status": 0, "seconds": seconds, "command": " ".join(command[1:]),
            "targets": report["targets"], "budget": report["budget"],
            "lengths": report["lengths"], "cp": report.get("cp")}  # fmt: skip


def run_decode_pool(out: Path) -> dict:
    command = [sys.executable, str(ROOT / "benchmarks" / "decode_pool.py"), "--device", "cuda",
               "--dtype", "bfloat16", "--runs", "3"]  # fmt: skip
    start = time.perf_counter()
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    seconds = round(time.perf_counter() - start, 1)
    if done.returncode != 0:
        return {"exit_status": done.returncode, "seconds": seconds, "log_tail": done.stderr[-3000:]}
    (out / "decode_pool.json").write_text(done.stdout)
    return {"exit_status": 0, "seconds": seconds, "steps": json.loads(done.stdout)["steps"]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="gpu_check_output", help="where to write (%(default)s)")
    parser.add_argument("--quick", action="store_true", help="the benchmark's --quick sizes")
    parser.add_argument("--skip-benchmark", action="store_true", help="tests only")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    summary = {"check": "gpu", "environment": environment()}
    if not torch.cuda.is_available():
        summary["error"] = "no CUDA device is visible: nothing to check"
        print(json.dumps(summary, indent=2))
        return 1
    print("running the gpu tests", file=sys.stderr, flush=True)
    summary["tests"] = run_tests(out)
    if not args.skip_benchmark:
        print("running the long-context benchmark on CUDA bf16", file=sys.stderr, flush=True)
        summary["long_context"] = run_benchmark(out, args.quick)
        print("running the decode pool benchmark on CUDA bf16", file=sys.stderr, flush=True)
        summary["decode_pool"] = run_decode_pool(out)
    (out / "gpu_check.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary, indent=2))
    failed = summary["tests"]["exit_status"] != 0
    benchmarks = ("long_context", "decode_pool")
    return int(failed or any(summary.get(b, {}).get("exit_status", 0) != 0 for b in benchmarks))


if __name__ == "__main__":
    sys.exit(main())
