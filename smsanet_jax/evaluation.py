"""The evaluation protocol (PSNR, SSIM, colourfulness at 256x256) and its report, sharded over all devices.

Every image is resized so that its short side is 256 (bicubic, antialiased) and centre-cropped to
256x256; the prediction is the ground truth's L with the predicted ab, converted to sRGB and
rounded to uint8, and both are scored per image (`metrics`), then averaged. The report holds:

  summary.json     mean, std and 95% confidence interval of every metric, n, the model (source,
                   checkpoint step, params hash, config), the data and protocol, the image list and
                   its sha256 (= `sha256sum images.txt`)
  per_image.csv    name, psnr, ssim, ssim_gaussian, colorfulness (in images.txt order)
  images.txt       the scored images, one name per line, sorted by id (dataset index / file path)
  grid.png         gray | prediction | truth for the best, median and worst image by PSNR
  predictions/, truth/   with `save_images`: every 256x256 prediction and ground truth as PNG

`evaluate` computes the scores and the grid and returns them; `evaluate_to_folder` also writes the
report, all or nothing; `format_table` is the short table the command prints.
"""

from __future__ import annotations

import abc
import concurrent.futures
import csv
import dataclasses
import datetime
import functools
import hashlib
import importlib.metadata
import io
import json
import logging
import math
import os
import time
from collections.abc import Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from scipy import stats

from smsanet_jax import colorspace, data, files, image_files, metrics, parallel, reporting
from smsanet_jax.data import decode, folders, transforms
from smsanet_jax.inference import Colorizer

METRICS = ("psnr", "ssim", "ssim_gaussian", "colorfulness")
IMAGE_SIZE = 256  # Paper §3.2: all images at 256x256.
PAPER_NUM_IMAGES = 1000  # Paper §3.2: 1000 images drawn from the test split.
# The grid shows these ranks of the images sorted by the headline metric.
GRID_METRIC = "psnr"
PROTOCOL = {
    "geometry": "short side resized to image_size (Pillow bicubic, antialiased), centre crop",
    "prediction": "L of the ground truth + predicted ab -> sRGB (scikit-image's Lab, D65) -> uint8, "
    "rounded half to even",
    "psnr": "skimage peak_signal_noise_ratio(data_range=255) on uint8 RGB, per image",
    "ssim": "skimage structural_similarity(channel_axis=-1, data_range=255), defaults: 7x7 uniform "
    "window, sample covariance, per image",
    "ssim_gaussian": "Wang et al. 2004: skimage structural_similarity with gaussian_weights=True, "
    "sigma=1.5, use_sample_covariance=False, data_range=255, per image",
    "colorfulness": "Hasler & Suesstrunk 2003 on the prediction (0..255 values), per image",
    "summary": "mean over images; std with ddof=1; ci95 = mean -/+ t(0.975, n-1) * std / sqrt(n); "
    "psnr statistics over images with finite PSNR (identical images have infinite PSNR "
    "and are counted in n_infinite)",
}
_OUTPUTS = ("summary.json", "per_image.csv", "images.txt", "grid.png")


class EvalImages(abc.ABC):
    """What is evaluated: a fixed set of image ids (sorted), each with a stable name.

    Attributes:
      ids: the selected ids, sorted; the report lists images in this order.
      image_size: side of the square evaluation crops.
      description: what the set is (folder or dataset, split, subset size, seed), for the report.
    """

    ids: np.ndarray
    image_size: int
    description: dict[str, Any]

    @abc.abstractmethod
    def name(self, example_id: int) -> str:
        """The stable name of an image (relative path, or the dataset's file name)."""

    @abc.abstractmethod
    def read(self, example_id: int) -> np.ndarray:
        """The ground truth at the evaluation geometry, uint8 [S, S, 3].

        Raises:
          decode.UnreadableImageError: the image does not decode.
        """

    @abc.abstractmethod
    def batches(self, local_batch_size: int) -> tuple[int, Iterator[dict[str, np.ndarray]]]:
        """(number of batches, this process's batches {"rgb", "id", "mask"}); every process gets as many.

        Padding rows have id -1; padding and unreadable images have mask False.
        """


class FolderImages(EvalImages):
    """Every image file under a folder (recursively, sorted by relative path), read directly.

    No preparation step: files are decoded with the loaders' robust decoder in a thread pool.
    """

    def __init__(
        self,
        root: str,
        *,
        image_size: int = IMAGE_SIZE,
        num_images: int | None = None,
        seed: int = 0,
        num_threads: int | None = None,
    ):
        listing = folders.list_folder(root)
        self.root = listing.root
        self._files = [f[0] for f in listing.files]
        self.ids = data.select_examples(len(self._files), num_images, seed)
        self.image_size = image_size
        self._threads = num_threads or min(8, os.cpu_count() or 1)
        self.description = {
            "folder": self.root,
            "num_files": len(self._files),
            "num_images_requested": num_images,
            "seed": seed,
            "image_size": image_size,
        }

    def name(self, example_id: int) -> str:
        return self._files[example_id]

    def read(self, example_id: int) -> np.ndarray:
        path = os.path.join(self.root, self._files[example_id])
        try:
            with open(path, "rb") as f:
                encoded = f.read()
        except OSError as e:
            raise decode.UnreadableImageError(str(e)) from e
        return transforms.center_crop(decode.decode_rgb(encoded), self.image_size)

    def _example(self, example_id: int) -> tuple[np.ndarray, bool]:
        if example_id < 0:
            return np.zeros((self.image_size, self.image_size, 3), np.uint8), False
        try:
            return self.read(example_id), True
        except decode.UnreadableImageError as e:
            logging.warning("skipping %s: unreadable (%s); masked out of the evaluation", self.name(example_id), e)
            return np.zeros((self.image_size, self.image_size, 3), np.uint8), False

    def batches(self, local_batch_size: int) -> tuple[int, Iterator[dict[str, np.ndarray]]]:
        # The same split as the dataset loader: contiguous per-process parts, padded with id -1.
        num_batches, padded = data.pad_for_process(self.ids, local_batch_size, jax.process_index(), jax.process_count())
        return num_batches, self._iterate(padded.reshape(num_batches, local_batch_size))

    def _iterate(self, id_batches: np.ndarray) -> Iterator[dict[str, np.ndarray]]:
        with concurrent.futures.ThreadPoolExecutor(self._threads) as pool:
            for ids, pending in image_files.prefetch(list(id_batches), lambda i: self._example(int(i)), pool):
                examples = [f.result() for f in pending]
                yield {
                    "rgb": np.stack([e[0] for e in examples]),
                    "id": ids,
                    "mask": np.array([e[1] for e in examples]),
                }


class DatasetImages(EvalImages):
    """A fixed random subset of a prepared dataset split (the paper protocol), via the grain loader."""

    def __init__(
        self,
        name: str,
        split: str,
        *,
        data_dir: str | None = None,
        image_size: int = IMAGE_SIZE,
        num_images: int | None = PAPER_NUM_IMAGES,
        seed: int = 0,
        num_workers: int = 0,
    ):
        self._args = dict(
            name=name,
            split=split,
            data_dir=data_dir,
            image_size=image_size,
            num_examples=num_images,
            seed=seed,
            num_workers=num_workers,
        )
        self.source = data.open_source(name, split, data_dir=data_dir)
        self.ids = data.select_examples(len(self.source), num_images, seed)
        self.image_size = image_size
        self.description = {
            "dataset": self.source.dataset,
            "split": split,
            "num_records": len(self.source),
            "num_images_requested": num_images,
            "seed": seed,
            "image_size": image_size,
        }

    def name(self, example_id: int) -> str:
        return self.source.name(example_id)

    def read(self, example_id: int) -> np.ndarray:
        # As the loader's evaluation examples: a full-resolution decode, then the crop.
        return transforms.center_crop(decode.decode_rgb(self.source[example_id]["image"]), self.image_size)

    def batches(self, local_batch_size: int) -> tuple[int, Iterator[dict[str, np.ndarray]]]:
        loader = data.make_eval_loader(local_batch_size=local_batch_size, **self._args)
        return loader.num_batches, iter(loader)


@dataclasses.dataclass
class _Scores:
    """Per-image results gathered from every process: ids, mask and the metrics, in batch order."""

    ids: list[np.ndarray] = dataclasses.field(default_factory=list)
    mask: list[np.ndarray] = dataclasses.field(default_factory=list)
    values: dict[str, list[np.ndarray]] = dataclasses.field(default_factory=lambda: {k: [] for k in METRICS})

    def add(self, host: dict[str, np.ndarray]) -> None:
        self.ids.append(host["id"])
        self.mask.append(host["mask"])
        for k in METRICS:
            self.values[k].append(host[k])

    def table(self) -> tuple[np.ndarray, dict[str, np.ndarray], np.ndarray]:
        """(scored ids sorted, metric -> values in that order, unreadable ids)."""
        ids, mask = np.concatenate(self.ids), np.concatenate(self.mask)
        unreadable = np.sort(ids[(ids >= 0) & ~mask])
        order = np.argsort(ids[mask], kind="stable")
        values = {k: np.concatenate(v)[mask][order].astype(np.float64) for k, v in self.values.items()}
        return ids[mask][order], values, unreadable


def predict_rgb(apply_fn, variables: Any, rgb_uint8: jax.Array) -> jax.Array:
    """Ground-truth L + predicted ab -> uint8 RGB (rounded), the image every metric scores."""
    l, _ = colorspace.rgb_uint8_to_l_ab(rgb_uint8)
    ab = apply_fn(variables, l, train=False).astype(jnp.float32)
    return colorspace.lab_to_rgb_uint8(colorspace.lab_from_l_ab(l, ab))


def eval_step(apply_fn, variables: Any, batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
    """Per-image prediction and scores of one batch (padding rows are scored too; mask them)."""
    pred = predict_rgb(apply_fn, variables, batch["rgb"])
    true = batch["rgb"]
    return {
        "pred_rgb": pred,
        "psnr": metrics.psnr(pred, true),
        "ssim": metrics.ssim(pred, true),
        "ssim_gaussian": metrics.ssim(pred, true, gaussian=True),
        "colorfulness": metrics.colorfulness(pred),
    }


@functools.lru_cache(maxsize=4)
def _compiled_eval_step(apply_fn):
    """The jitted eval step of one model: evaluating it again reuses the compilation."""
    return jax.jit(functools.partial(eval_step, apply_fn))


def comparison_grid(truth: np.ndarray, pred: np.ndarray) -> np.ndarray:
    """One row per image: its gray version (ab = 0) | the prediction | the ground truth."""
    l, _ = colorspace.rgb_uint8_to_l_ab(jnp.asarray(truth))
    gray = np.asarray(colorspace.lab_to_rgb_uint8(colorspace.lab_from_l_ab(l, jnp.zeros_like(l).repeat(2, -1))))
    return reporting.image_grid([[g, p, t] for g, p, t in zip(gray, pred, truth)])


@dataclasses.dataclass(frozen=True)
class Evaluation:
    """What `evaluate` found: the summary (summary.json), per-image values and the comparison grid."""

    summary: dict[str, Any]
    names: list[str]  # The scored images, in id order (images.txt).
    values: dict[str, np.ndarray]  # Metric -> per-image values, in `names` order.
    grid: np.ndarray  # uint8 RGB: gray | prediction | truth for the best, median and worst image.


def check_report_folder(out_dir: str, overwrite: bool) -> str:
    """Checks, before any scoring, that `out_dir` can take a report; returns it absolute.

    Raises:
      ValueError: `out_dir` is a file or not writable, or holds a report and `overwrite` is False.
    """
    out_dir = files.check_output_folder(out_dir, "--out")
    existing = [f for f in _OUTPUTS if os.path.exists(os.path.join(out_dir, f))]
    if existing and not overwrite:
        raise ValueError(
            f"--out {out_dir}: already holds an evaluation ({', '.join(existing)}); use --overwrite or another --out"
        )
    return out_dir


def evaluate_to_folder(
    colorizer: Colorizer,
    images: EvalImages,
    out_dir: str,
    *,
    overwrite: bool = False,
    save_images: bool = False,
    **options: Any,
) -> Evaluation:
    """Scores `colorizer` on `images` and writes the whole report to `out_dir`, or nothing.

    The report is built in a temporary folder beside `out_dir` and swapped in at the end
    (`files.replace_folder`), so a failure (a write error, a full disk, an interrupt) leaves the
    previous report whole and no stray files; with `overwrite`, nothing of the old report (stale
    prediction images included) survives the new one. Only process 0 writes.

    Args:
      colorizer, images: as `evaluate`.
      out_dir: the report folder (see the module docstring).
      overwrite: replace a report already in `out_dir`.
      save_images: also write every prediction and ground truth (256x256 PNG).
      **options: `batch_size`, `num_devices` of `evaluate`.

    Raises:
      ValueError: see `check_report_folder` and `evaluate`.
    """
    out_dir = check_report_folder(out_dir, overwrite)
    if jax.process_index() > 0:
        return evaluate(colorizer, images, save_images=save_images, **options)
    with files.replace_folder(out_dir) as staging:
        result = evaluate(
            colorizer, images, images_dir=staging if save_images else None, save_images=save_images, **options
        )
        write_report(staging, result)
    return result


def evaluate(
    colorizer: Colorizer,
    images: EvalImages,
    *,
    batch_size: int = 16,
    num_devices: int = 0,
    save_images: bool = False,
    images_dir: str | None = None,
) -> Evaluation:
    """Scores `colorizer` on `images` (see the module docstring); writes nothing but `images_dir`.

    Args:
      colorizer: the model (`inference.load_colorizer`).
      images: `FolderImages` or `DatasetImages`.
      batch_size: global batch; rounded up to a multiple of the number of devices.
      num_devices: use the first N devices (0: all devices of all processes).
      save_images: gather every prediction and ground truth (every process must pass the same).
      images_dir: with `save_images`, where process 0 writes them (predictions/, truth/).

    Returns:
      The summary, per-image values and the grid.

    Raises:
      ValueError: a bad batch size, or nothing was readable.
    """
    if batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {batch_size}")
    mesh = parallel.make_mesh(num_devices)
    global_batch = parallel.round_up_to_devices(batch_size, mesh)
    if global_batch != batch_size:
        logging.info(
            "batch size %d rounded up to %d (a multiple of the %d devices)", batch_size, global_batch, mesh.size
        )
    variables = jax.device_put(colorizer.variables, parallel.replicated(mesh))
    eval_fn = _compiled_eval_step(colorizer.apply_fn)

    started = time.perf_counter()
    num_batches, batches = images.batches(parallel.local_batch_size(global_batch, mesh))
    progress = reporting.Progress(num_batches, global_batch, enabled=jax.process_index() == 0)
    scores = _Scores()
    every = max(1, num_batches // 50)
    keys = (*METRICS, "pred_rgb", "rgb") if save_images else METRICS

    def collect(k: int, out: dict[str, jax.Array], placed: dict) -> None:
        host = _gather({**out, "rgb": placed["rgb"]}, placed, keys)
        scores.add(host)
        if images_dir:
            _save_images(images, images_dir, host)
        if (k + 1) % every == 0 or k + 1 == num_batches:
            progress.update(k + 1)

    # Results are fetched one batch late, so the next batch is read while the devices compute.
    pending = None
    for k, batch in enumerate(batches):
        current = (k, *_dispatch(eval_fn, variables, batch, mesh))
        if pending:
            collect(*pending)
        pending = current
    if pending:
        collect(*pending)
    ids, values, unreadable = scores.table()
    if not len(ids):
        raise ValueError(f"none of the {len(images.ids)} images could be read")
    grid_ids = _grid_ids(ids, values[GRID_METRIC])
    grid = _grid(eval_fn, variables, images, grid_ids, global_batch, mesh)
    names = [images.name(int(i)) for i in ids]
    summary = _summary(
        colorizer,
        images,
        names,
        values,
        [images.name(int(i)) for i in unreadable],
        {rank: images.name(int(i)) for rank, i in grid_ids.items()},
    )
    summary["run"] = {
        "devices": mesh.size,
        "processes": jax.process_count(),
        "platform": jax.default_backend(),
        "batch_size": global_batch,
        "seconds": round(time.perf_counter() - started, 2),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "versions": _versions(),
    }
    return Evaluation(summary, names, values, grid)


def _dispatch(eval_fn, variables, batch: dict[str, np.ndarray], mesh) -> tuple[dict[str, jax.Array], dict]:
    """Starts one sharded eval step; returns (its output, the placed global batch), both on the devices."""
    local = {"rgb": batch["rgb"], "mask": batch["mask"], "id": np.asarray(batch["id"], np.int32)}
    placed = parallel.make_global(local, mesh)
    return eval_fn(variables, placed), placed


def _gather(out: dict[str, jax.Array], placed: dict, keys: Sequence[str] = METRICS) -> dict[str, np.ndarray]:
    """Every process's rows of `keys`, with their ids and mask, on the host."""
    # The ids travel with the rows, so nothing assumes how processes' rows are ordered globally.
    return multihost_utils.process_allgather(
        {**{k: out[k] for k in keys}, "id": placed["id"], "mask": placed["mask"]}, tiled=True
    )


def _grid_ids(ids: np.ndarray, values: np.ndarray) -> dict[str, int]:
    """Ids of the best, median and worst image by `values` (ties: the lower id)."""
    order = np.lexsort((ids, -values))  # Best first.
    return {"best": int(ids[order[0]]), "median": int(ids[order[(len(order) - 1) // 2]]), "worst": int(ids[order[-1]])}


def _grid(eval_fn, variables, images: EvalImages, grid_ids: dict[str, int], global_batch: int, mesh) -> np.ndarray:
    """gray | prediction | truth rows for `grid_ids`, predicted again with the same compiled step.

    Every process runs the same padded global batch (its own slice of it), as in the main pass.
    """
    wanted = list(grid_ids.values())
    truth = {i: images.read(i) for i in set(wanted)}
    blank = np.zeros_like(truth[wanted[0]])
    rows = [*wanted, *[-1] * (-len(wanted) % global_batch)]  # Padded to whole global batches.
    local = global_batch // jax.process_count()
    predicted = {}
    for start in range(0, len(rows), global_batch):
        mine = rows[start : start + global_batch][jax.process_index() * local : (jax.process_index() + 1) * local]
        batch = {
            "rgb": np.stack([truth.get(i, blank) for i in mine]),
            "id": np.array(mine),
            "mask": np.array([i >= 0 for i in mine]),
        }
        host = _gather(*_dispatch(eval_fn, variables, batch, mesh), keys=("pred_rgb",))
        predicted.update({int(i): p for i, p in zip(host["id"], host["pred_rgb"]) if i >= 0})
    return comparison_grid(np.stack([truth[i] for i in wanted]), np.stack([predicted[i] for i in wanted]))


def _statistics(values: np.ndarray, count_infinite: bool = False) -> dict[str, Any]:
    finite = values[np.isfinite(values)]
    n = len(finite)
    result: dict[str, Any] = {"mean": float(np.mean(finite)) if n else None, "std": None, "ci95": None}
    if n > 1:
        std = float(np.std(finite, ddof=1))
        half = float(stats.t.ppf(0.975, n - 1)) * std / math.sqrt(n)
        result.update(std=std, ci95=[result["mean"] - half, result["mean"] + half])
    if count_infinite:
        result["n_infinite"] = int(len(values) - n)
    return result


def list_sha256(names: Sequence[str]) -> str:
    """SHA-256 of images.txt: the names, one per line, each ending in a newline."""
    return hashlib.sha256(_lines(names).encode()).hexdigest()


def _lines(names: Sequence[str]) -> str:
    return "".join(f"{n}\n" for n in names)


def _summary(
    colorizer: Colorizer,
    images: EvalImages,
    names: list[str],
    values: dict[str, np.ndarray],
    unreadable: list[str],
    grid: dict[str, str],
) -> dict[str, Any]:
    summary: dict[str, Any] = {"n": len(names)}
    for k in METRICS:
        summary[k] = _statistics(values[k], count_infinite=k == "psnr")
    summary["model"] = dict(colorizer.provenance)
    summary["data"] = dict(images.description)
    summary["protocol"] = PROTOCOL
    summary["images_sha256"] = list_sha256(names)
    summary["images"] = names
    summary["unreadable"] = unreadable
    summary["grid"] = {
        "ranked_by": GRID_METRIC,
        "rows": ["best", "median", "worst"],
        "columns": ["gray", "prediction", "truth"],
        **grid,
    }
    return summary


def _versions() -> dict[str, str]:
    versions = {}
    for package in ("smsanet-jax", "jax", "flax", "scikit-image", "pillow", "numpy"):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            pass
    return versions


def write_report(out_dir: str, result: Evaluation) -> None:
    """Writes summary.json, per_image.csv, images.txt and grid.png into `out_dir` (each atomically)."""
    files.write_text(os.path.join(out_dir, "images.txt"), _lines(result.names))
    rows = io.StringIO()
    writer = csv.writer(rows, lineterminator="\n")
    writer.writerow(["name", *METRICS])
    for i, name in enumerate(result.names):
        writer.writerow([name, *(repr(float(result.values[k][i])) for k in METRICS)])
    files.write_text(os.path.join(out_dir, "per_image.csv"), rows.getvalue())
    reporting.write_png(os.path.join(out_dir, "grid.png"), result.grid)
    # Last: a summary.json means the report is complete.
    summary = json.dumps(result.summary, indent=2, allow_nan=False) + "\n"
    files.write_text(os.path.join(out_dir, "summary.json"), summary)


def image_file_name(name: str) -> str:
    """A relative PNG path for an image name: same folders and stem; '..' and absolute parts dropped."""
    parts = [p for p in name.replace("\\", "/").split("/") if p not in ("", ".", "..")]
    return os.path.join(*parts[:-1], os.path.splitext(parts[-1])[0] + ".png") if parts else "unnamed.png"


def _save_images(images: EvalImages, out_dir: str, host: dict[str, np.ndarray]) -> None:
    """Writes the gathered predictions and ground truths of one batch (masked rows skipped)."""
    for example_id, keep, truth, prediction in zip(host["id"], host["mask"], host["rgb"], host["pred_rgb"]):
        if keep:
            relative = image_file_name(images.name(int(example_id)))
            for folder, image in (("predictions", prediction), ("truth", truth)):
                reporting.write_png(os.path.join(out_dir, folder, relative), np.asarray(image))


def format_table(summary: dict[str, Any]) -> str:
    """The short result table printed at the end of `evaluate`."""
    model = summary["model"]
    step = f" step {model['step']}" if model.get("step") else ""
    lines = [
        f"{model['source']}{step} on {summary['n']} images (list sha256 {summary['images_sha256'][:12]})",
        f"{'metric':<15}{'mean':>10}{'std':>10}   95% CI",
    ]
    fmt = lambda v: "-" if v is None else f"{v:.4f}"
    for k in METRICS:
        s = summary[k]
        ci = "-" if s["ci95"] is None else f"[{s['ci95'][0]:.4f}, {s['ci95'][1]:.4f}]"
        lines.append(f"{k:<15}{fmt(s['mean']):>10}{fmt(s['std']):>10}   {ci}")
    if summary["psnr"]["n_infinite"]:
        lines.append(
            f"({summary['psnr']['n_infinite']} images reproduced exactly: infinite PSNR, "
            "left out of the PSNR statistics)"
        )
    if summary["unreadable"]:
        lines.append(f"({len(summary['unreadable'])} unreadable images skipped: see summary.json)")
    return "\n".join(lines)
