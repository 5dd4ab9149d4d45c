"""The `smsanet-jax` command: thin argument parsing in front of the library's functions."""

from __future__ import annotations

import argparse
import logging
import sys

from smsanet_jax import host_memory


def _train(args: argparse.Namespace, overrides: list[str]) -> int:
    import jax  # pylint: disable=import-outside-toplevel

    from smsanet_jax import config_util, parallel, train  # pylint: disable=import-outside-toplevel

    parallel.initialize_distributed(args.coordinator, args.num_processes, args.process_id)
    if jax.process_index() > 0:  # One voice: the other processes report only problems.
        logging.getLogger().setLevel(logging.WARNING)
    config = config_util.load_config(args.config, overrides)
    train.train_and_evaluate(config, args.workdir)
    return 0


def _prepare_data(args: argparse.Namespace, overrides: list[str]) -> int:
    del overrides
    from smsanet_jax import data  # pylint: disable=import-outside-toplevel

    data.prepare(args.name, data_dir=args.data_dir, manual_dir=args.manual_dir, source=args.source)
    return 0


def _colorizer(args: argparse.Namespace, overrides: list[str]):
    from smsanet_jax import inference  # pylint: disable=import-outside-toplevel

    return inference.load_colorizer(
        workdir=args.workdir, params=args.params, config=args.config, overrides=overrides, baseline=args.baseline
    )


def _evaluate(args: argparse.Namespace, overrides: list[str]) -> int:
    from smsanet_jax import evaluate, parallel  # pylint: disable=import-outside-toplevel

    parallel.initialize_distributed(args.coordinator, args.num_processes, args.process_id)
    # --num-images 0 means all; unset: all of a folder, the paper's 1000 of a dataset split.
    num = None if args.num_images == 0 else args.num_images
    if args.images:
        images = evaluate.FolderImages(args.images, image_size=args.image_size, num_images=num, seed=args.seed)
    else:
        images = evaluate.DatasetImages(
            args.dataset,
            args.split,
            data_dir=args.data_dir,
            image_size=args.image_size,
            num_images=evaluate.PAPER_NUM_IMAGES if args.num_images is None else num,
            seed=args.seed,
            num_workers=args.num_workers,
        )
    evaluate.evaluate(
        _colorizer(args, overrides),
        images,
        args.out,
        batch_size=args.batch_size,
        num_devices=args.num_devices,
        save_images=args.save_images,
        overwrite=args.overwrite,
    )
    return 0


def _report(report, verb: str, out: str) -> int:
    """Prints what an inference command did; non-zero exit status if any input failed."""
    print(f"{verb} {len(report.written)} files in {out}", file=sys.stderr)
    if report.failed:
        print(f"{len(report.failed)} inputs failed:", file=sys.stderr)
        for what, reason in report.failed:
            print(f"  {what}: {reason}", file=sys.stderr)
        return 1
    return 0


def _colorize(args: argparse.Namespace, overrides: list[str]) -> int:
    from smsanet_jax import colorize  # pylint: disable=import-outside-toplevel

    report = colorize.colorize(
        _colorizer(args, overrides),
        args.inputs,
        args.out,
        hints=args.hints,
        overwrite=args.overwrite,
        batch_size=args.batch_size,
        fmt=args.format,
        num_devices=args.num_devices,
    )
    return _report(report, "wrote", args.out)


def _saliency(args: argparse.Namespace, overrides: list[str]) -> int:
    del overrides
    from smsanet_jax import colorize  # pylint: disable=import-outside-toplevel

    report = colorize.saliency_maps(
        args.params,
        args.inputs,
        args.out,
        threshold=args.threshold,
        size=args.size,
        overwrite=args.overwrite,
        batch_size=args.batch_size,
    )
    return _report(report, "wrote", args.out)


def _convert_weights(args: argparse.Namespace, overrides: list[str]) -> int:
    del overrides
    from smsanet_jax import convert  # pylint: disable=import-outside-toplevel

    meta = convert.convert_file(args.kind, args.src, args.dst, overwrite=args.overwrite)
    print(
        f"wrote {args.kind} weights to {args.dst} ({', '.join(f'{k} {v}' for k, v in meta.items())})", file=sys.stderr
    )
    return 0


def _add_model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model (exactly one)")
    g.add_argument("--workdir", help="a training workdir: its config and latest checkpoint")
    g.add_argument("--params", help="a weights file (convert-weights output); needs --config")
    g.add_argument(
        "--config",
        help="the config of --params' network, e.g. configs/basenet.py (--config.key=value overrides allowed)",
    )
    g.add_argument("--baseline", choices=["gray"], help="gray: ab = 0 (the floor to beat)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="smsanet-jax", description="SMSANet image colorization in JAX: train, evaluate, colorize."
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser(
        "train",
        help="train (resumes from --workdir when it has a checkpoint)",
        description="Extra --config.key=value arguments override the config file.",
    )
    p.add_argument("--config", required=True, help="a config file, e.g. configs/smsanet.py")
    p.add_argument("--workdir", required=True, help="checkpoints, TensorBoard logs, metrics, images")
    p.add_argument("--coordinator", help="multi-host: address:port of process 0")
    p.add_argument("--num-processes", type=int, help="multi-host: number of processes")
    p.add_argument("--process-id", type=int, help="multi-host: this process's index")
    p.set_defaults(run=_train, accepts_overrides=True)

    p = sub.add_parser("prepare-data", help="prepare a dataset (array_record) for training/evaluation")
    p.add_argument("name", help="sample_photos, a tfds name (e.g. imagenet2012) or an image folder")
    p.add_argument("--data-dir", help="tfds data dir (default: TFDS_DATA_DIR or ~/tensorflow_datasets)")
    p.add_argument("--manual-dir", help="where manually downloaded files are (ImageNet tars)")
    p.add_argument("--source", help="the image folder to prepare (same as giving it as NAME)")
    p.set_defaults(run=_prepare_data, accepts_overrides=False)

    p = sub.add_parser(
        "evaluate",
        help="PSNR/SSIM/colourfulness on a pinned protocol (256x256 centre crops)",
        description="Scores a model on a folder or a dataset split and writes summary.json, "
        "per_image.csv, images.txt and grid.png to --out.",
    )
    _add_model_args(p)
    d = p.add_mutually_exclusive_group(required=True)
    d.add_argument("--images", help="a folder of images (recursive; no preparation step); or --dataset")
    d.add_argument("--dataset", help="a prepared dataset: imagenet2012, sample_photos, a tfds name")
    p.add_argument("--split", default="validation", help="dataset split (paper: test)")
    p.add_argument("--data-dir", help="tfds data dir")
    p.add_argument(
        "--num-images", type=int, help="images drawn with --seed (default: 1000 of a dataset, all of a folder; 0: all)"
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the drawn subset")
    p.add_argument("--out", required=True, help="report folder")
    p.add_argument("--batch-size", type=int, default=16, help="global batch (a multiple of the devices)")
    p.add_argument("--image-size", type=int, default=256, help="evaluation crop side (paper: 256)")
    p.add_argument("--num-devices", type=int, default=0, help="use the first N devices (0: all)")
    p.add_argument("--num-workers", type=int, default=0, help="grain decoding processes (datasets)")
    p.add_argument("--save-images", action="store_true", help="also write predictions/ and truth/ PNGs")
    p.add_argument("--overwrite", action="store_true", help="replace a report already in --out")
    p.add_argument("--coordinator", help="multi-host: address:port of process 0")
    p.add_argument("--num-processes", type=int, help="multi-host: number of processes")
    p.add_argument("--process-id", type=int, help="multi-host: this process's index")
    p.set_defaults(run=_evaluate, accepts_overrides=True)

    p = sub.add_parser(
        "colorize",
        help="colorize photos at full resolution (optional point hints)",
        description="The network runs at 256x256; only ab is upsampled and merged with "
        "the original full-resolution L. Exit status 1 if any input failed.",
    )
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="image files, folders or glob patterns")
    _add_model_args(p)
    p.add_argument("--out", required=True, help="output folder (input names are kept)")
    p.add_argument(
        "--hints",
        help='JSON: [{"x": col, "y": row, "a": A, "b": B}, ...] for every image, '
        "or {image name: [points]}; pixel coordinates of the original, raw Lab ab",
    )
    p.add_argument("--format", choices=["png", "jpg"], default="png", help="output format")
    p.add_argument("--batch-size", type=int, default=8, help="images per network call")
    p.add_argument("--num-devices", type=int, default=0, help="use the first N devices (0: all)")
    p.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    p.set_defaults(run=_colorize, accepts_overrides=True)

    p = sub.add_parser("saliency", help="PFANet saliency probability and mask PNGs at the input's size")
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="image files, folders or glob patterns")
    p.add_argument("--params", required=True, help="PFANet weights (convert-weights pfanet-s|pfanet-k)")
    p.add_argument("--out", required=True, help="writes <name>_saliency.png and <name>_mask.png here")
    p.add_argument("--threshold", type=float, default=0.5, help="mask: probability >= threshold")
    p.add_argument("--size", type=int, default=256, help="PFANet input side (a multiple of 16)")
    p.add_argument("--batch-size", type=int, default=8, help="images per network call")
    p.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    p.set_defaults(run=_saliency, accepts_overrides=False)

    p = sub.add_parser(
        "convert-weights",
        help="published SIGGRAPH17 / PFANet weights -> a weights file",
        description="The output is read by train (--config.init.basenet / init.pfanet), "
        "evaluate and colorize (--params with --config) and saliency (--params).",
    )
    p.add_argument(
        "kind",
        choices=["siggraph17", "pfanet-s", "pfanet-k"],
        help="siggraph17: Zhang et al.'s .pth; pfanet-s: the PyTorch port's .pth; pfanet-k: the official Keras .h5",
    )
    p.add_argument("src", help="the published checkpoint")
    p.add_argument("dst", help="the weights file to write (.msgpack)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing DST")
    p.set_defaults(run=_convert_weights, accepts_overrides=False)
    return parser


def main(argv: list[str] | None = None) -> None:
    """The `smsanet-jax` program; `argv` None reads the command line (and may restart the process)."""
    if argv is None:  # A program, not a call from Python: its malloc is ours to tune.
        host_memory.reexec_with_tuned_malloc()
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    overrides = [u for u in unknown if u.startswith("--config.")]
    rest = [u for u in unknown if not u.startswith("--config.")]
    if rest or (overrides and not args.accepts_overrides):
        parser.error(f"unrecognized arguments: {' '.join(rest or overrides)}")
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(message)s",
        datefmt="%H:%M:%S",
    )
    if not args.verbose:
        # orbax, grain and jax log every internal step (through absl), and warn about routine things.
        for name in ("absl", "jax", "orbax"):
            logging.getLogger(name).setLevel(logging.ERROR)
    try:
        status = args.run(args, overrides)
    except (ValueError, FileNotFoundError, FloatingPointError) as e:
        # Expected user errors (bad config, bad file, mismatched checkpoint): the message, no traceback.
        logging.debug("details", exc_info=True)
        print(f"smsanet-jax {args.command}: error: {e}", file=sys.stderr)
        status = 2
    sys.exit(status)
