"""Model configurations of the tiny world and construction of its diffusers pipeline.

The shapes are SD-1-like (CLIP text encoder, cross-attention UNet, KL VAE) but tiny, so a
batch of 32x32 images generates on a CPU in well under a second.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .data import CANVAS
from .vocab import BOS, EOS, MAX_LENGTH, make_tokenizer

LATENT_SIDE = 8  # the VAE downsamples 32x32 images by 4
TEXT_DIM = 64  # CLIP hidden size = UNet cross-attention dim

TEXT_CONFIG = dict(
    hidden_size=TEXT_DIM,
    intermediate_size=128,
    projection_dim=TEXT_DIM,
    num_hidden_layers=2,
    num_attention_heads=2,
    max_position_embeddings=MAX_LENGTH,
    hidden_act="quick_gelu",
)

UNET_CONFIG = dict(
    sample_size=LATENT_SIDE,
    in_channels=4,
    out_channels=4,
    layers_per_block=1,
    block_out_channels=(32, 64),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    mid_block_type="UNetMidBlock2DCrossAttn",
    cross_attention_dim=TEXT_DIM,
    attention_head_dim=2,  # diffusers' legacy name: the number of heads
    norm_num_groups=8,
)

VAE_CONFIG = dict(
    sample_size=CANVAS,
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 3,
    up_block_types=("UpDecoderBlock2D",) * 3,
    block_out_channels=(16, 32, 64),
    layers_per_block=1,
    latent_channels=4,
    norm_num_groups=8,
    mid_block_add_attention=False,
)

# DDPM's linear betas: the last step is pure noise, which suits a model trained from scratch
SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000,
    beta_schedule="linear",
    beta_start=0.0001,
    beta_end=0.02,
    prediction_type="epsilon",
    steps_offset=1,
)


def make_text_encoder(tokenizer):
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.convert_tokens_to_ids(BOS),
        eos_token_id=tokenizer.convert_tokens_to_ids(EOS),
        pad_token_id=tokenizer.convert_tokens_to_ids(EOS),
        **TEXT_CONFIG,
    )
    return CLIPTextModel(config)


def make_unet():
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(**UNET_CONFIG)


def make_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(**VAE_CONFIG)


def make_train_scheduler():
    from diffusers import DDPMScheduler

    return DDPMScheduler(**SCHEDULER_CONFIG)


def make_sample_scheduler():
    """DPM-Solver++ (2M): good digits in about 20 steps."""
    from diffusers import DPMSolverMultistepScheduler

    return DPMSolverMultistepScheduler(**SCHEDULER_CONFIG)


def make_pipeline(work_dir: str | Path, seed: int = 0, vae=None):
    """A freshly initialised StableDiffusionPipeline; the tokenizer files go into ``work_dir``."""
    from diffusers import StableDiffusionPipeline

    torch.manual_seed(seed)
    tokenizer = make_tokenizer(Path(work_dir) / "tokenizer_src")
    return StableDiffusionPipeline(
        vae=vae if vae is not None else make_vae(),
        text_encoder=make_text_encoder(tokenizer),
        tokenizer=tokenizer,
        unet=make_unet(),
        scheduler=make_sample_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
