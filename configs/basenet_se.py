"""Table 2 row "BaseNet + SENet": SE in place of SMSA, Huber loss only.

smsanet-jax train --config configs/basenet_se.py --workdir runs/basenet_se
"""

from configs import smsanet


def get_config():
    c = smsanet.get_config()
    c.model.attention = "se"
    c.loss.alpha = 0.0
    return c
