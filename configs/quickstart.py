"""A narrow SMSANet trained on the embedded sample photos: minutes on a laptop CPU, no download.

  smsanet-jax train --config configs/quickstart.py --workdir runs/quickstart
It shows the whole loop (data, sharded step, checkpoints, TensorBoard, colorized grids); the
colours it learns from a dozen photos are not meant to be good.
"""

from configs import smsanet


def get_config():
    c = smsanet.get_config()
    c.num_train_steps = 1000
    c.global_batch_size = 8
    c.image_size = 64
    c.optimizer.learning_rate = 1e-3  # From scratch and short: the paper's 1e-5 fine-tunes.
    c.model.width = 16
    c.loss.alpha = 0.0  # No PFANet weights ship with the package.
    c.data.name = "sample_photos"
    c.data.num_workers = 0
    c.data.gray_threshold = 0.0
    c.log_every_steps = 10
    c.checkpoint_every_steps = 200
    c.eval_every_steps = 200
    c.eval_num_examples = 8
    c.eval_batch_size = 8
    return c
