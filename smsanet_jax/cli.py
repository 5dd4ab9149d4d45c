"""The `smsanet-jax` command: argument parsing, checks at the door, and everything the user reads.

Every path is made absolute here, once, as the user typed it (relative to the current folder, `~`
expanded); every number is range-checked before any work starts. A user error is one line,
`smsanet-jax CMD: error: ...`, and exit status 2 (`-v` adds the traceback). Library functions
return values; this module prints them.
"""

from __future__ import annotations

import argparse
import logging
import sys

from smsanet_jax import files
from smsanet_jax.cpu import malloc

# Errors a user can fix: bad arguments, configs, files, a full disk. Anything else is a bug.
USER_ERRORS = (ValueError, FileNotFoundError, FloatingPointError, OSError, ModuleNotFoundError)


def _paths(args: argparse.Namespace, *names: str) -> None:
    """Makes the named path arguments absolute (unset ones stay None)."""
    for name in names:
        value = getattr(args, name, None)
        if value is not None:
            setattr(args, name, files.resolve(value))


def _at_least(args: argparse.Namespace, minimum: int, *names: str) -> None:
    """Checks integer options against their lower bound, naming the option."""
    for name in names:
        value = getattr(args, name, None)
        if value is not None and value < minimum:
            raise ValueError(f"--{name.replace('_', '-')} must be >= {minimum}, got {value}")


def _train(args: argparse.Namespace, overrides: list[str]) -> int:
    import jax

    from smsanet_jax import config_util, parallel, train

    args.workdir = files.check_output_folder(args.workdir, "--workdir")
    config = config_util.load_config(files.resolve(args.config), overrides)
    parallel.initialize_distributed(args.coordinator, args.num_processes, args.process_id)
    if jax.process_index() > 0:  # One voice: the other processes report only problems.
        logging.getLogger().setLevel(logging.WARNING)
    train.train_and_evaluate(config, args.workdir)
    return 0


def _prepare_data(args: argparse.Namespace, overrides: list[str]) -> int:
    del overrides
    from smsanet_jax import data

    _paths(args, "data_dir", "manual_dir", "source")
    print(data.prepare(args.name, data_dir=args.data_dir, manual_dir=args.manual_dir, source=args.source))
    return 0


def _model_paths(args: argparse.Namespace) -> None:
    _paths(args, "workdir", "params", "config")


def _colorizer(args: argparse.Namespace, overrides: list[str]):
    from smsanet_jax import inference

    return inference.load_colorizer(
        workdir=args.workdir, params=args.params, config=args.config, overrides=overrides, baseline=args.baseline
    )


def _evaluate(args: argparse.Namespace, overrides: list[str]) -> int:
    import jax

    from smsanet_jax import evaluation, parallel

    _model_paths(args)
    _paths(args, "images", "data_dir")
    _at_least(args, 1, "batch_size", "image_size")
    _at_least(args, 0, "num_images", "num_devices", "num_workers")
    args.out = evaluation.check_report_folder(args.out, args.overwrite)  # Before any scoring.
    parallel.initialize_distributed(args.coordinator, args.num_processes, args.process_id)
    # --num-images 0 means all; unset: all of a folder, the paper's 1000 of a dataset split.
    num = None if args.num_images == 0 else args.num_images
    if args.images:
        images = evaluation.FolderImages(args.images, image_size=args.image_size, num_images=num, seed=args.seed)
    else:
        images = evaluation.DatasetImages(
            args.dataset,
            args.split,
            data_dir=args.data_dir,
            image_size=args.image_size,
            num_images=evaluation.PAPER_NUM_IMAGES if args.num_images is None else num,
            seed=args.seed,
            num_workers=args.num_workers,
        )
    result = evaluation.evaluate_to_folder(
        _colorizer(args, overrides),
        images,
        args.out,
        overwrite=args.overwrite,
        save_images=args.save_images,
        batch_size=args.batch_size,
        num_devices=args.num_devices,
    )
    if jax.process_index() == 0:
        print(evaluation.format_table(result.summary))
        print(f"report in {args.out}", file=sys.stderr)
    return 0


def _report(report, out: str) -> int:
    """Prints what an inference command did; non-zero exit status if any input failed."""
    print(f"wrote {len(report.written)} files in {out}", file=sys.stderr)
    if report.failed:
        print(f"{len(report.failed)} inputs failed:", file=sys.stderr)
        for what, reason in report.failed:
            print(f"  {what}: {reason}", file=sys.stderr)
        return 1
    return 0


def _colorize(args: argparse.Namespace, overrides: list[str]) -> int:
    from smsanet_jax import colorize

    _model_paths(args)
    _paths(args, "hints")
    _at_least(args, 1, "batch_size")
    _at_least(args, 0, "num_devices")
    args.out = files.check_output_folder(args.out, "--out")
    files.check_not_inside(args.out, args.inputs, "--out")
    network = _photo_network(args, overrides)
    report = colorize.colorize(
        network, args.inputs, args.out, hints_file=args.hints, overwrite=args.overwrite, fmt=args.format
    )
    return _report(report, args.out)


def _saliency(args: argparse.Namespace, overrides: list[str]) -> int:
    del overrides
    from smsanet_jax import saliency

    _paths(args, "params")
    _at_least(args, 1, "batch_size", "size")
    args.out = files.check_output_folder(args.out, "--out")
    report = saliency.saliency_maps(
        args.params,
        args.inputs,
        args.out,
        threshold=args.threshold,
        size=args.size,
        overwrite=args.overwrite,
        batch_size=args.batch_size,
    )
    return _report(report, args.out)


def _convert_weights(args: argparse.Namespace, overrides: list[str]) -> int:
    del overrides
    from smsanet_jax import convert

    _paths(args, "src", "dst")
    meta = convert.convert_file(args.kind, args.src, args.dst, overwrite=args.overwrite)
    details = ", ".join(f"{k} {v}" for k, v in meta.items())
    print(f"wrote {args.kind} weights to {args.dst} ({details})", file=sys.stderr)
    return 0


def _add_model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model (exactly one)")
    g.add_argument("--workdir", help="a training workdir: its config and latest intact checkpoint")
    g.add_argument("--params", help="a weights file (convert-weights output); needs --config")
    g.add_argument(
        "--config",
        help="the config of --params' network, e.g. configs/basenet.py (--config.key=value overrides allowed)",
    )
    g.add_argument("--baseline", choices=["gray"], help="gray: ab = 0 (the floor to beat)")


def _add_multihost_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--coordinator", help="multi-host: address:port of process 0")
    p.add_argument("--num-processes", type=int, help="multi-host: number of processes")
    p.add_argument("--process-id", type=int, help="multi-host: this process's index")


def _pixel_count(value: str) -> int:
    """A count written as an integer or in exponent form (5e7)."""
    try:
        return int(float(value))
    except (ValueError, OverflowError):
        raise argparse.ArgumentTypeError(f"expected a number of pixels such as 5e7, got {value!r}") from None


def _demo(args: argparse.Namespace, overrides: list[str]) -> int:
    try:
        from smsanet_jax import demo
    except ModuleNotFoundError as e:
        raise ValueError(f"the demo needs {e.name}: pip install 'smsanet-jax[demo]'") from None

    _model_paths(args)
    given = {"max_upload_mb": args.max_upload_mb, "max_pixels": args.max_pixels}
    limits = demo.Limits(**{k: v for k, v in given.items() if v is not None})
    limits.check()
    with demo.listen(args.host, args.port) as listener:  # A busy port fails before the model loads.
        engine = demo.DemoEngine(_colorizer(args, overrides), limits)
        print(f"smsanet-jax demo: open {listener.url} in a browser (Ctrl-C stops the server)", flush=True)
        if not listener.loopback:
            print(
                f"smsanet-jax demo: warning: listening on {args.host}, not only on this machine; the page has "
                "no authentication: anyone who can reach this address can upload photos and use the model",
                file=sys.stderr,
                flush=True,
            )
        demo.serve(engine, listener)
    return 0


def _photo_network(args: argparse.Namespace, overrides: list[str]):
    """colorize's network: an exported ONNX file in onnxruntime (JAX is never imported), or a JAX model."""
    if args.onnx is None:
        from smsanet_jax import inference

        colorizer = _colorizer(args, overrides)
        return inference.PhotoColorizer(colorizer, batch_size=args.batch_size, num_devices=args.num_devices)
    from smsanet_jax import exported

    if overrides or any(getattr(args, name) is not None for name in ("workdir", "params", "config", "baseline")):
        raise ValueError("--onnx: the exported file is the whole model; drop --workdir, --params, --config, --baseline")
    return exported.OnnxColorizer(files.resolve(args.onnx), batch_size=args.batch_size)


def _export(args: argparse.Namespace, overrides: list[str]) -> int:
    from smsanet_jax import export

    _model_paths(args)
    _at_least(args, 1, "image_size", "batch")
    if any(override.split("=", 1)[0] == "--config.conv_impl" for override in overrides):
        raise ValueError(
            "--config.conv_impl: export always traces the portable XLA convolutions (the CPU fast path's custom "
            "calls cannot be exported, and the weights are the same either way); drop the option"
        )
    args.out = export.check_out(args.out, args.format, args.overwrite)  # Before the model loads.
    result = export.export_colorizer(
        _colorizer(args, overrides),
        args.out,
        fmt=args.format,
        image_size=args.image_size,
        batch=args.batch,
        overwrite=args.overwrite,
    )
    meta = result.metadata
    batch = "any batch" if meta["batch"] is None else f"batch {meta['batch']}"
    target = f"opset {meta['opset']}" if args.format == "onnx" else f"platforms {', '.join(meta['platforms'])}"
    print(
        f"wrote {result.path} ({result.num_bytes / 2**20:.1f} MiB; {args.format}, {target}; "
        f"{meta['image_size']}x{meta['image_size']}, {batch}); max |ab - JAX| = {result.max_abs_error:.2g} "
        f"raw ab units on the test input",
        file=sys.stderr,
    )
    if result.metadata_path:
        print(f"its metadata: {result.metadata_path}", file=sys.stderr)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="smsanet-jax", description="SMSANet image colorization in JAX: train, evaluate, colorize."
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging and tracebacks")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser(
        "train",
        help="train (resumes from --workdir when it has a checkpoint)",
        description="Extra --config.key=value arguments override the config file.",
    )
    p.add_argument("--config", required=True, help="a config file, e.g. configs/smsanet.py")
    p.add_argument("--workdir", required=True, help="checkpoints, TensorBoard logs, metrics, images")
    _add_multihost_args(p)
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
    _add_multihost_args(p)
    p.set_defaults(run=_evaluate, accepts_overrides=True)

    p = sub.add_parser(
        "colorize",
        help="colorize photos at full resolution (optional point hints)",
        description="The network runs at 256x256; only ab is upsampled and merged with "
        "the original full-resolution L. Exit status 1 if any input failed.",
    )
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="image files, folders or glob patterns")
    _add_model_args(p)
    p.add_argument("--out", required=True, help="output folder (input names are kept); not inside an input folder")
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

    p = sub.add_parser(
        "demo",
        help="an interactive colorizer in the browser (point hints, before/after, downloads)",
        description="Serves a page that colorizes a photo at full resolution and takes point hints by "
        "clicking; it prints the page's address. See docs/demo.md.",
    )
    _add_model_args(p)
    p.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to listen on (default 127.0.0.1: this machine only; the page has no authentication)",
    )
    p.add_argument("--port", type=int, default=8000, help="port (default 8000; 0: any free port)")
    p.add_argument("--max-upload-mb", type=float, help="largest photo file accepted, in MB (default 50)")
    p.add_argument(
        "--max-pixels",
        type=_pixel_count,
        help="most pixels a photo may have, e.g. 5e7 (default 50 million; larger photos are refused unread)",
    )
    p.set_defaults(run=_demo, accepts_overrides=True)
    p = sub.choices["colorize"]
    p.add_argument(
        "--onnx",
        metavar="FILE",
        help="instead of a model: an ONNX export (smsanet-jax export --format onnx) run by onnxruntime; "
        "works without JAX (docs/export.md)",
    )

    p = sub.add_parser(
        "export",
        help="the colorizer's inference as a StableHLO or ONNX file, checked against JAX",
        description="Writes L [N,S,S,1] (+ ab hints [N,S,S,2], mask [N,S,S,1]) -> raw ab [N,S,S,2] with the "
        "weights embedded, runs the file once and fails (writing nothing) if it differs from the JAX model "
        "by more than 1e-3 ab units. See docs/export.md.",
    )
    _add_model_args(p)
    p.add_argument("--format", required=True, choices=["stablehlo", "onnx"], help="file format")
    p.add_argument("--out", required=True, help="the file to write (StableHLO: its metadata goes to OUT.json)")
    p.add_argument("--image-size", type=int, default=256, help="input side S (a multiple the network needs; 256)")
    p.add_argument("--batch", type=int, help="a fixed batch N (default: any batch)")
    p.add_argument("--overwrite", action="store_true", help="replace existing output files")
    p.set_defaults(run=_export, accepts_overrides=True)
    return parser


def _quiet_libraries() -> None:
    # orbax, grain and jax log every internal step (through absl), and warn about routine things.
    for name in ("absl", "jax", "orbax"):
        logging.getLogger(name).setLevel(logging.ERROR)


def main(argv: list[str] | None = None) -> None:
    """The `smsanet-jax` program; `argv` None reads the command line (and may restart the process)."""
    if argv is None:  # A program, not a call from Python: its malloc is ours to tune.
        malloc.reexec_with_tuned_malloc()
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
        _quiet_libraries()
    try:
        status = args.run(args, overrides)
    except USER_ERRORS as e:
        if args.verbose:
            logging.exception("details")
        print(f"smsanet-jax {args.command}: error: {_one_line(e)}", file=sys.stderr)
        status = 2
    except KeyboardInterrupt:
        print(f"smsanet-jax {args.command}: interrupted", file=sys.stderr)
        status = 130
    sys.exit(status)


def _one_line(error: Exception) -> str:
    """The error's message; OS errors name the file and what went wrong, without errno noise."""
    if isinstance(error, ModuleNotFoundError):
        return f"{error.name} is not installed; this command needs it (see the extras in docs/export.md)"
    if isinstance(error, OSError) and error.strerror:
        where = f"{error.filename}: " if error.filename else ""
        return f"{where}{error.strerror}"
    return str(error)
