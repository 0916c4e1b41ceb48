"""`longvita demo`: the whole pipeline on a tiny random model and synthetic media.

Prints what each step did (tiles, tokens), its time and the process's peak memory. The weights
are random, so the text is noise; the point is to show every stage running end to end.
"""

from __future__ import annotations

import resource
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")


def _peak_rss_mb() -> float:
    """High-water mark of this process's resident memory, in MB (Linux reports KB)."""
    kilobytes = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kilobytes / 1024 if sys.platform != "darwin" else kilobytes / 1024**2


def _step(name: str, fn: Callable[[], T]) -> T:
    start = time.perf_counter()
    result = fn()
    seconds = time.perf_counter() - start
    print(f"  {name:<48} {seconds * 1000:9.1f} ms   peak RSS {_peak_rss_mb():7.0f} MB")
    return result


def run(output: str | Path, *, max_new_tokens: int = 16) -> None:
    import longvita
    from longvita.testing import make_image, make_tiny_checkpoint, make_video

    output = Path(output)
    media = output / "media"
    media.mkdir(parents=True, exist_ok=True)
    checkpoint = output / "tiny-random-long-vita"
    print("longvita demo: a TINY RANDOM model (the weights are random: its text is noise)")
    print(f"writing into {output.resolve()}\n")
    _step("build random checkpoint", lambda: make_tiny_checkpoint(checkpoint))
    image = _step("synthetic image 640x360", lambda: make_image(media / "scene.png"))
    video = _step(
        "synthetic video 12 s @ 4 fps", lambda: make_video(media / "clip.mp4", num_frames=48)
    )
    pipe = _step("longvita.load", lambda: longvita.load(checkpoint, device="cpu", dtype="float32"))
    tile = pipe.config.vision.image_size
    print(
        f"\nmodel: {sum(p.numel() for p in pipe.model.parameters()):,} parameters, "
        f"{tile}-px tiles of {pipe.config.vision.tokens_per_tile} tokens\n"
    )
    cases = [
        ("text only", "Describe a quiet morning.", [], []),
        ("one image", "<image>\nWhat is in this image?", [image], []),
        ("one video", "<video>\nDescribe the video.", [], [video]),
    ]
    for label, prompt, images, videos in cases:
        print(f"[{label}] prompt: {prompt!r}")
        processed = _step(
            "process (tokenize, lay out tiles)",
            lambda p=prompt, i=images, v=videos: pipe.process(p, i, v),
        )
        print(
            f"    grids {processed.image_grids} frames {processed.video_frames} "
            f"tiles {processed.num_tiles} prompt tokens {processed.num_tokens}"
        )
        out = _step(
            "generate (decode pixels, ViT, prefill, decode)",
            lambda p=prompt, i=images, v=videos: pipe.generate(
                p, images=i, videos=v, max_new_tokens=max_new_tokens
            ),
        )
        rate = len(out.token_ids) / out.decode_seconds if out.decode_seconds else float("nan")
        print(
            f"    prefill {out.prefill_seconds * 1000:.1f} ms, {len(out.token_ids)} new tokens "
            f"at {rate:.0f} tok/s ({out.stop_reason})"
        )
        print(f"    text (random weights): {out.text!r}\n")
    print(
        "done: every stage ran. Point `longvita generate --model DIR` at a real checkpoint for "
        "real answers."
    )
