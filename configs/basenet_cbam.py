"""Table 2 row "BaseNet + CBAM": CBAM in place of SMSA, Huber loss only.

smsanet-jax train --config configs/basenet_cbam.py --workdir runs/basenet_cbam
"""

from configs import smsanet


def get_config():
    c = smsanet.get_config()
    c.model.attention = "cbam"
    c.loss.alpha = 0.0
    return c
