"""SMSANet: BaseNet with stacked multi-scale attention after model5, model6 and model7."""

from __future__ import annotations

from smsanet_jax.models.basenet import BaseNet


class SMSANet(BaseNet):
    """BaseNet with `attention="smsa"` by default (paper defaults: n = 4, r = 16).

    Its params are BaseNet's under identical paths plus `attention_model5/6/7`, so SIGGRAPH17
    weights (`convert.siggraph17_from_torch`) initialise the backbone; set `attention` to "cbam" or
    "se" for the paper's Table 2 baselines and `blocks` to move the attention.
    """

    attention: str = "smsa"
