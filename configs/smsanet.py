"""SMSANet as in the paper (Tables 1-3, last row): SMSA after model5-7, Huber + salient loss.

Command (8 GPUs on one host; ImageNet prepared as array_record, converted weights optional):
  smsanet-jax train --config configs/smsanet.py --workdir runs/smsanet \
      --config.init.basenet=weights/siggraph17.msgpack --config.init.pfanet=weights/pfanet_s.msgpack
Every other config imports this file and overrides a few fields.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    """The paper's setting: ImageNet 256x256, Adam 1e-5 (0.9, 0.999), 40k steps."""
    c = ml_collections.ConfigDict()
    c.seed = 0  # Parameter init and data order.
    c.num_train_steps = 40_000  # Paper §3.2.
    c.global_batch_size = 16  # Not in the paper; what fits a 1080Ti-11GB era GPU (docs/design.md, Training).
    c.image_size = 256  # Training crops and evaluation size (paper §3.2).
    c.dtype = "float32"  # Compute dtype: float32 | bfloat16 (params always float32).
    c.conv_impl = "auto"  # auto | xla | cpu: convolution implementation (auto picks by backend).
    c.num_devices = 0  # 0: every device of every process; N: the first N (single process only).

    c.optimizer = ml_collections.ConfigDict()
    c.optimizer.learning_rate = 1e-5  # Paper §3.2.
    c.optimizer.b1 = 0.9
    c.optimizer.b2 = 0.999

    c.model = ml_collections.ConfigDict()
    c.model.attention = "smsa"  # none | smsa | cbam | se.
    c.model.blocks = ("model5", "model6", "model7")  # Blocks followed by an attention module.
    c.model.width = 64  # Base channel count (64 = SIGGRAPH17; smaller for quick runs).
    c.model.n_scales = 4  # SMSA: n-1 spatial scales (1/2, 1/4, 1/8) + the channel scale.
    c.model.reduction = 16  # Channel-attention MLP reduction (SMSA, CBAM, SE).

    c.loss = ml_collections.ConfigDict()
    c.loss.alpha = 1.0  # Weight of the salient loss (Eq. 7); 0 never runs PFANet.
    c.loss.norm = "l1"  # Salient loss norm: l1 | l2.
    c.loss.threshold = 0.5  # PFANet probability that counts as salient.
    c.loss.pfanet_variant = "s"  # s (PyTorch port, published weights) | k (official Keras).
    c.loss.pfanet_size = 256  # PFANet's input size.

    c.init = ml_collections.ConfigDict()
    c.init.basenet = ""  # Converted SIGGRAPH17 weights (smsanet-jax convert-weights); "" = random.
    c.init.pfanet = ""  # Converted PFANet weights; required when loss.alpha > 0 ("random" for tests).

    c.data = ml_collections.ConfigDict()
    c.data.name = "imagenet2012"  # A tfds name, sample_photos, or a folder path.
    c.data.data_dir = ""  # tfds data dir; "" = TFDS_DATA_DIR or ~/tensorflow_datasets.
    c.data.train_split = "train"
    c.data.eval_split = "validation"
    c.data.num_workers = 8  # grain worker processes per host (0: decode in the main process).
    c.data.gray_threshold = 5.0  # Skip training images whose ab range is below this (Zhang et al.).

    c.log_every_steps = 50  # Progress line, scalars and the metrics file.
    c.checkpoint_every_steps = 1000
    c.keep_checkpoints = 3  # At least 1: the newest checkpoint is always kept.
    # Every N steps and at the end: the evaluation protocol on held-out images, written to
    # eval/step_N/ (summary, per-image CSV, gray | prediction | truth grid) and to TensorBoard;
    # eval_num_examples = 0 trains without evaluating.
    c.eval_every_steps = 2000
    c.eval_num_examples = 500  # Held-out images drawn with the seed (the paper's test uses 1000); 0: none.
    c.eval_batch_size = 16
    return c
