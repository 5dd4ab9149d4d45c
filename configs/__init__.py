"""Experiment configs: `smsanet.py` is the paper; every other file imports it and overrides."""
