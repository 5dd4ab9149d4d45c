"""The `smsanet-jax` command: thin argument parsing in front of the library's functions."""

from __future__ import annotations

import argparse
import logging
import sys


def _train(args: argparse.Namespace, overrides: list[str]) -> int:
    from smsanet_jax import config_util, parallel, train  # pylint: disable=import-outside-toplevel

    parallel.initialize_distributed(args.coordinator, args.num_processes, args.process_id)
    config = config_util.load_config(args.config, overrides)
    train.train_and_evaluate(config, args.workdir)
    return 0


def _prepare_data(args: argparse.Namespace, overrides: list[str]) -> int:
    del overrides
    from smsanet_jax import data  # pylint: disable=import-outside-toplevel

    data.prepare(args.name, data_dir=args.data_dir, manual_dir=args.manual_dir, source=args.source)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="smsanet-jax", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train (resumes from --workdir when it has a checkpoint)",
                       description="Extra --config.key=value arguments override the config file.")
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
    return parser


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    overrides = [u for u in unknown if u.startswith("--config.")]
    rest = [u for u in unknown if not u.startswith("--config.")]
    if rest or (overrides and not args.accepts_overrides):
        parser.error(f"unrecognized arguments: {' '.join(rest or overrides)}")
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    try:
        status = args.run(args, overrides)
    except (ValueError, FileNotFoundError, FloatingPointError) as e:
        # Expected user errors (bad config, bad file, mismatched checkpoint): the message, no traceback.
        logging.debug("details", exc_info=True)
        print(f"smsanet-jax {args.command}: error: {e}", file=sys.stderr)
        status = 2
    sys.exit(status)
