"""The networks: BaseNet (SIGGRAPH17), SMSANet and PFANet (the saliency network of the salient loss)."""

from smsanet_jax.models.basenet import BaseNet
from smsanet_jax.models.smsanet import SMSANet

__all__ = ["BaseNet", "PFANet", "SMSANet"]


def __getattr__(name: str):
    # PFANet is being written concurrently; import it on first use until it exists.
    if name == "PFANet":
        from smsanet_jax.models.pfanet import PFANet  # pylint: disable=import-outside-toplevel
        return PFANet
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
