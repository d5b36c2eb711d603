"""Style LoRAs: trained with PEFT on styled digits, saved in kohya's format like real downloads.

kohya (sd-scripts) names an SD-1 LoRA module ``lora_unet_<diffusers module path, "." -> "_">``
or ``lora_te_text_model_<text encoder module path>``; each has ``lora_down.weight`` (PEFT's lora_A),
``lora_up.weight`` (lora_B) and a 0-dim ``alpha``, so that dW = alpha / rank * up @ down.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from ..outputs import Staged
from . import data as D
from .training import EMA, cosine_lr, diffusion_loss, encode, seed_everything, token_ids

UNET_ATTN = ["to_q", "to_k", "to_v", "to_out.0"]  # attn1 (self) and attn2 (cross) alike
UNET_PROJ = ["proj_in", "proj_out"]  # 1x1 convolutions in SD-1's transformer blocks
UNET_FF = ["ff.net.0.proj", "ff.net.2"]
TEXT_ATTN = ["q_proj", "k_proj", "v_proj", "out_proj"]

# ranks and alphas differ on purpose (alpha != rank for slanted, shifted and small), and so do
# the targeted module sets, as they do among LoRAs found in the wild. ``uncond_plain``: see
# train_lora (bold at 0.5 overshoots into blobs the classifier misreads). ``lr``: where
# alpha/rank is 0.5 the update is halved, and at 4e-3 those LoRAs drew the style on badly
# formed digits (digit accuracy 0.57 shifted, 0.78 small; 0.83 and 0.87 at these rates)
SPECS = {
    "bold": dict(rank=4, alpha=4.0, unet=UNET_ATTN, uncond_plain=0.3, lr=4e-3),
    "slanted": dict(rank=8, alpha=16.0, unet=UNET_ATTN + UNET_PROJ + UNET_FF, uncond_plain=0.5, lr=4e-3),
    "shifted": dict(rank=8, alpha=4.0, unet=UNET_ATTN + UNET_FF, uncond_plain=0.5, lr=1.2e-2),
    "small": dict(rank=16, alpha=8.0, unet=UNET_ATTN + UNET_PROJ + UNET_FF, uncond_plain=0.5, lr=8e-3),
}


def add_adapters(pipe, style: str) -> list[torch.nn.Parameter]:
    """Attach fresh PEFT LoRA adapters to the UNet and the text encoder; return their parameters."""
    from peft import LoraConfig, inject_adapter_in_model

    spec = SPECS[style]
    pipe.unet.add_adapter(LoraConfig(r=spec["rank"], lora_alpha=spec["alpha"], target_modules=spec["unet"]))
    # PEFT directly (as diffusers' loader does): transformers' add_adapter wants a newer PEFT
    inject_adapter_in_model(LoraConfig(r=spec["rank"], lora_alpha=spec["alpha"], target_modules=TEXT_ATTN),
                            pipe.text_encoder, adapter_name="default")
    for module in (pipe.unet, pipe.text_encoder, pipe.vae):
        for name, p in module.named_parameters():
            p.requires_grad_("lora_" in name)
    return [p for m in (pipe.unet, pipe.text_encoder) for p in m.parameters() if p.requires_grad]


def train_lora(pipe, style: str, steps: int, seed: int = 0, batch: int = 64, lr: float | None = None,
               drop_prompt: float = 0.1, uncond_plain: float | None = None, log=print):
    """Fit one style: the styled training digits, prompted "a handwritten <digit>, <trigger>",
    the empty prompt for a ``drop_prompt`` share of the batch, paired with plain digits in an
    ``uncond_plain`` share of those."""
    from .build import make_train_scheduler

    if uncond_plain is None:
        uncond_plain = SPECS[style]["uncond_plain"]
    if lr is None:
        lr = SPECS[style]["lr"]
    seed_everything(seed)
    images, labels = D.load_split("train")
    scale = pipe.vae.config.scaling_factor
    latents = encode(pipe.vae, D.TRANSFORMS[style](images)) * scale
    plain = encode(pipe.vae, images) * scale
    ids_per_digit = token_ids(pipe.tokenizer, [D.prompt(d, [style]) for d in range(10)])
    empty_ids = token_ids(pipe.tokenizer, [""])[0]
    params = add_adapters(pipe, style)
    scheduler = make_train_scheduler()
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    ema = EMA(params, 0.99)
    gen = torch.Generator().manual_seed(seed)
    pipe.unet.train()
    pipe.text_encoder.train()
    for step in range(steps):
        cosine_lr(opt, step, steps, lr, warmup=20)
        idx = torch.randint(0, len(latents), (batch,), generator=gen)
        ids = ids_per_digit[labels[idx]].clone()
        dropped = torch.rand(batch, generator=gen) < drop_prompt
        ids[dropped] = empty_ids
        # the empty prompt draws plain digits part of the time: the unconditional branch of
        # classifier-free guidance then sits between base and style, so guidance pushes towards
        # the style (all styled: it pushes away from it; all plain: it overshoots into blobs)
        as_plain = dropped & (torch.rand(batch, generator=gen) < uncond_plain)
        target = torch.where(as_plain.view(-1, 1, 1, 1), plain[idx], latents[idx])
        loss = diffusion_loss(pipe.unet, pipe.text_encoder, scheduler, target, ids, gen)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        ema.update(step)
        if step % 50 == 0 or step == steps - 1:
            log(f"lora {style} step {step}/{steps} loss {loss.item():.4f}")
    ema.copy_to_model()
    pipe.unet.eval()
    pipe.text_encoder.eval()
    return pipe


def kohya_name(prefix: str, module: str) -> str:
    """"lora_unet_" or "lora_te_" + module path with dots as underscores."""
    if prefix == "lora_te_" and not module.startswith("text_model."):
        module = "text_model." + module  # transformers 5 flattened CLIPTextModel; kohya names keep it
    return prefix + module.replace(".", "_")


def kohya_state_dict(pipe, style: str, dtype=torch.float16) -> dict[str, torch.Tensor]:
    """PEFT adapter weights of ``pipe`` renamed to kohya keys."""
    alpha = float(SPECS[style]["alpha"])
    out = {}
    for prefix, model in (("lora_unet_", pipe.unet), ("lora_te_", pipe.text_encoder)):
        for key, value in model.state_dict().items():
            # "down_blocks.0. ... .attn1.to_q.lora_A.default.weight" -> module path, A or B
            found = re.fullmatch(r"(.+)\.lora_([AB])\.default\.weight", key)
            if not found:
                continue
            name = kohya_name(prefix, found.group(1))
            part = "lora_down.weight" if found.group(2) == "A" else "lora_up.weight"
            out[f"{name}.{part}"] = value.detach().to(dtype).contiguous()
            out[f"{name}.alpha"] = torch.tensor(alpha, dtype=dtype)
    return dict(sorted(out.items()))


def kohya_metadata(style: str, steps: int) -> dict[str, str]:
    spec = SPECS[style]
    return {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(spec["rank"]),
        "ss_network_alpha": str(spec["alpha"]).rstrip("0").rstrip("."),
        "ss_base_model_version": "sd_v1",
        "ss_resolution": f"({D.CANVAS}, {D.CANVAS})",
        "ss_max_train_steps": str(steps),
        "ss_output_name": f"tinyworld_{style}",
        "modelspec.sai_model_spec": "1.0.1",
        "modelspec.architecture": "stable-diffusion-v1/lora",
        "modelspec.implementation": "diffusers",
        "modelspec.title": f"tinyworld {style}",
        "modelspec.trigger_phrase": D.TRIGGERS[style],
        "modelspec.resolution": f"{D.CANVAS}x{D.CANVAS}",
        "modelspec.description": f"Style LoRA for the loramerge tiny digit world: {D.TRANSFORMS[style].__doc__}",
    }


def save_kohya(pipe, style: str, path: str | Path, steps: int) -> Path:
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with Staged([path]) as (tmp,):  # atomic: a killed run leaves the old file whole
        save_file(kohya_state_dict(pipe, style), str(tmp), metadata=kohya_metadata(style, steps))
    return path

