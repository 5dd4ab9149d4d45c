"""The smallest useful model, for tests: 32x32 crops, width 8, a few seconds per step on a CPU.

smsanet-jax train --config configs/tiny.py --workdir /tmp/tiny
"""

from configs import quickstart


def get_config():
    c = quickstart.get_config()
    c.num_train_steps = 4
    c.global_batch_size = 8
    c.image_size = 32
    c.model.width = 8
    c.model.n_scales = 3  # SMSA at 4x4 feature maps: scales 1/2 and 1/4.
    c.loss.pfanet_size = 32
    c.log_every_steps = 1
    c.eval_every_steps = 2
    c.checkpoint_every_steps = 2
    c.eval_num_examples = 4
    c.eval_batch_size = 8
    return c
