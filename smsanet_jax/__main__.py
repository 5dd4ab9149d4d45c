"""`python -m smsanet_jax` is the `smsanet-jax` command."""

from smsanet_jax.cli import main

if __name__ == "__main__":
    main()
