"""Helpers for the PyTorch reference modules of the parity tests."""

import torch


def perturb_batch_norms(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Moves every BN's affine params and running stats away from their defaults, so they matter."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5, generator=gen)
                m.bias.normal_(0, 0.2, generator=gen)
                m.running_mean.normal_(0, 0.2, generator=gen)
                m.running_var.uniform_(0.5, 2.0, generator=gen)
    return model
