"""The networks: BaseNet (SIGGRAPH17), SMSANet and PFANet (the saliency network of the salient loss)."""

from smsanet_jax.models.basenet import BaseNet
from smsanet_jax.models.pfanet import PFANet
from smsanet_jax.models.smsanet import SMSANet

__all__ = ["BaseNet", "PFANet", "SMSANet"]
