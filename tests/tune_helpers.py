"""A user objective for the tune tests (imported by name, as ``tune_helpers:unet_response``)."""

import torch

CALLS = []


def unet_response(pipe, **context):
    """Deterministic and cheap: how the UNet with the candidate applied answers a fixed input,
    compared with a fixed target (so weights change the score smoothly)."""
    g = torch.Generator().manual_seed(0)
    sample = torch.randn(1, 4, 8, 8, generator=g)
    hidden = torch.randn(1, 16, 64, generator=g)
    with torch.no_grad():
        out = pipe.unet(sample, 500, encoder_hidden_states=hidden).sample
    CALLS.append(1)
    return {"score": -float((out - 0.1).pow(2).mean()), "norm": float(out.norm())}
