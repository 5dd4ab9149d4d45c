"""smsanet-jax: SMSANet image colorization (ICASSP 2022) in JAX/Flax."""

__version__ = "0.1.0"
