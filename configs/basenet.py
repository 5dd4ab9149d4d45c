"""Table 3 row "BaseNet, Huber": the SIGGRAPH17 generator alone, Huber loss only.

smsanet-jax train --config configs/basenet.py --workdir runs/basenet
"""

from configs import smsanet


def get_config():
    c = smsanet.get_config()
    c.model.attention = "none"
    c.loss.alpha = 0.0
    return c
