"""Table 3 row "BaseNet, Huber + Salient": no attention, salient loss on (alpha 1).

  smsanet-jax train --config configs/basenet_salient.py --workdir runs/basenet_salient \
      --config.init.pfanet=weights/pfanet_s.msgpack
"""

from configs import smsanet


def get_config():
    c = smsanet.get_config()
    c.model.attention = "none"
    return c
