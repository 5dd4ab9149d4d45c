"""What a user sees of a long job: a progress line, TensorBoard, a metrics file and image grids.

Only process 0 writes; the others get a writer that does nothing, so callers never branch on it.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from collections.abc import Mapping, Sequence

import numpy as np
from PIL import Image

from smsanet_jax import files


def image_grid(rows: Sequence[Sequence[np.ndarray]], pad: int = 2) -> np.ndarray:
    """Tiles equally sized uint8 RGB images, `rows[i][j]` at row i column j, with white gutters."""
    h, w = rows[0][0].shape[:2]
    cols = max(len(r) for r in rows)
    grid = np.full((len(rows) * (h + pad) - pad, cols * (w + pad) - pad, 3), 255, np.uint8)
    for i, row in enumerate(rows):
        for j, img in enumerate(row):
            img = np.asarray(img)
            grid[i * (h + pad) : i * (h + pad) + h, j * (w + pad) : j * (w + pad) + w] = (
                img if img.ndim == 3 else img[..., None]
            )
    return grid


def write_png(path: str, image: np.ndarray) -> None:
    """Writes a PNG atomically (`files.atomic_write`): a reader never sees a half-written file."""
    files.atomic_write(path, lambda f: Image.fromarray(image).save(f, format="PNG"))


class MetricWriter:
    """JSON-lines file plus TensorBoard event files in `logdir`; inert when `enabled` is False."""

    def __init__(self, logdir: str, enabled: bool = True):
        self.enabled = enabled
        if not enabled:
            return
        from tensorboardX import SummaryWriter  # pylint: disable=import-outside-toplevel

        os.makedirs(logdir, exist_ok=True)
        self._tb = SummaryWriter(logdir)
        self._jsonl = open(os.path.join(logdir, "metrics.jsonl"), "a", encoding="utf-8")

    def scalars(self, step: int, values: Mapping[str, float]) -> None:
        if not self.enabled:
            return
        values = {k: float(v) for k, v in values.items()}
        for k, v in values.items():
            self._tb.add_scalar(k, v, step)
        self._jsonl.write(json.dumps({"step": step, **values}) + "\n")
        self._jsonl.flush()

    def image(self, step: int, tag: str, image: np.ndarray) -> None:
        if self.enabled:
            self._tb.add_image(tag, image, step, dataformats="HWC")

    def text(self, tag: str, text: str) -> None:
        if self.enabled:
            self._tb.add_text(tag, text, 0)

    def close(self) -> None:
        if self.enabled:
            self._tb.close()
            self._jsonl.close()


def format_seconds(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class Progress:
    """A progress line (step / total, images/s, ETA) printed at the caller's cadence on process 0."""

    def __init__(
        self, total_steps: int, images_per_step: int, first_step: int = 0, enabled: bool = True, stream=sys.stderr
    ):
        self.total_steps = total_steps
        self.images_per_step = images_per_step
        self.enabled = enabled
        self.stream = stream
        self._last_step = first_step
        self._last_time = time.perf_counter()

    def update(self, step: int, extra: Mapping[str, float] | None = None) -> float:
        """Reports `step` and returns the images/s since the previous update."""
        now = time.perf_counter()
        rate = (step - self._last_step) * self.images_per_step / max(now - self._last_time, 1e-9)
        self._last_step, self._last_time = step, now
        if self.enabled:
            eta = (self.total_steps - step) * self.images_per_step / max(rate, 1e-9)
            fields = "".join(f" | {k} {v:.4g}" for k, v in (extra or {}).items())
            print(
                f"step {step}/{self.total_steps}{fields} | {rate:.2f} img/s | ETA {format_seconds(eta)}",
                file=self.stream,
                flush=True,
            )
        logging.debug("step %d: %.2f img/s", step, rate)
        return rate
