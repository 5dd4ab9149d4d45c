"""Table 2 / Table 3 row "SMSANet, Huber": SMSA after model5-7, no salient loss.

smsanet-jax train --config configs/smsanet_huber.py --workdir runs/smsanet_huber
"""

from configs import smsanet


def get_config():
    c = smsanet.get_config()
    c.loss.alpha = 0.0
    return c
