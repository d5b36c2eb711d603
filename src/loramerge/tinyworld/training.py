"""Training loops of the tiny world (VAE, text encoder + UNet, classifier, style LoRAs).

The scripts in scripts/ are thin wrappers around these functions; ``steps`` arguments let the
same code run as a seconds-long smoke test or as the full run.
"""

from __future__ import annotations

import math
import random
import time

import numpy as np
import torch
import torch.nn.functional as F

from . import data as D
from . import detectors as det


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def cosine_lr(opt, step: int, total: int, base_lr: float, warmup: int = 50) -> None:
    """Linear warm-up, then cosine decay to 5% of the base rate."""
    if step < warmup:
        lr = base_lr * (step + 1) / warmup
    else:
        progress = (step - warmup) / max(1, total - warmup)
        lr = base_lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress)))
    for group in opt.param_groups:
        group["lr"] = lr


class Log:
    """Prints progress lines with the elapsed time."""

    def __init__(self, quiet: bool = False):
        self.start, self.quiet = time.time(), quiet

    def __call__(self, msg: str) -> None:
        if not self.quiet:
            print(f"[{time.time() - self.start:7.1f}s] {msg}", flush=True)


def all_styles(images: torch.Tensor, labels: torch.Tensor):
    """Plain digits followed by every style: (images, labels, style index; 0 = plain)."""
    xs, ys, ss = [images], [labels], [torch.zeros(len(labels), dtype=torch.long)]
    for i, style in enumerate(D.STYLES, start=1):
        xs.append(D.TRANSFORMS[style](images))
        ys.append(labels)
        ss.append(torch.full((len(labels),), i, dtype=torch.long))
    return torch.cat(xs), torch.cat(ys), torch.cat(ss)


# ---- detectors ------------------------------------------------------------------------------

def fit_detectors() -> dict:
    """Thresholds from the training split; AUC and hit rates on the held-out split."""
    train_x, _ = D.load_split("train")
    held_x, _ = D.load_split("held_out")
    result = {}
    for style, score in det.SCORES.items():
        transform = D.TRANSFORMS[style]
        train_neg = det.style_scores(train_x, [style])[style]
        threshold = det.fit_threshold(train_neg, det.style_scores(transform(train_x), [style])[style])
        neg = det.style_scores(held_x, [style])[style]
        pos = det.style_scores(transform(held_x), [style])[style]
        result[style] = {
            "score": score.__name__,
            "threshold": round(threshold, 5),
            "held_out_auc": round(det.roc_auc(neg, pos), 5),
            "held_out_true_positive_rate": round(float((pos > threshold).mean()), 4),
            "held_out_false_positive_rate": round(float((neg > threshold).mean()), 4),
        }
    return result


def _augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Small shifts, blur, contrast changes and noise: generated digits are never pixel-perfect."""
    n = len(x)
    shift = (torch.randint(-2, 3, (n, 2), generator=gen).float() * 2.0 / D.CANVAS)
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0] = theta[:, 1, 1] = 1.0
    theta[:, :, 2] = shift
    x = F.grid_sample(x, F.affine_grid(theta, list(x.shape), align_corners=False), align_corners=False)
    blur = torch.tensor([1.0, 2.0, 1.0])
    kernel = (blur[:, None] * blur[None, :] / 16.0).view(1, 1, 3, 3)
    blurred = F.conv2d(x, kernel, padding=1)
    mix = torch.rand(n, 1, 1, 1, generator=gen)
    x = mix * blurred + (1 - mix) * x
    x = x * (0.7 + 0.6 * torch.rand(n, 1, 1, 1, generator=gen))
    x = x + 0.05 * torch.randn(x.shape, generator=gen)
    return x.clamp(0.0, 1.0)


def train_classifier(steps: int, seed: int = 0, batch: int = 128, log=print):
    seed_everything(seed)
    images, labels = D.load_split("train")
    x, y, _ = all_styles(images, labels)
    net = det.DigitNet()
    opt = torch.optim.AdamW(net.parameters(), lr=2e-3, weight_decay=1e-4)
    gen = torch.Generator().manual_seed(seed)
    net.train()
    for step in range(steps):
        cosine_lr(opt, step, steps, 2e-3)
        idx = torch.randint(0, len(x), (batch,), generator=gen)
        loss = F.cross_entropy(net(_augment(x[idx], gen)), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 200 == 0 or step == steps - 1:
            log(f"classifier step {step}/{steps} loss {loss.item():.4f}")
    return net.eval()


def classifier_accuracy(net) -> dict:
    """Held-out accuracy per style (plain included)."""
    held_x, held_y = D.load_split("held_out")
    out = {"plain": float((det.classify(net, held_x) == held_y.numpy()).mean())}
    for style in D.STYLES:
        pred = det.classify(net, D.TRANSFORMS[style](held_x))
        out[style] = float((pred == held_y.numpy()).mean())
    out["all"] = float(np.mean(list(out.values())))
    return {k: round(v, 4) for k, v in out.items()}


# ---- VAE ------------------------------------------------------------------------------------

def to_rgb(x: torch.Tensor) -> torch.Tensor:
    """Grey [0, 1] (N, 1, H, W) -> the VAE's RGB [-1, 1]."""
    return (x * 2.0 - 1.0).expand(-1, 3, -1, -1)


def from_rgb(x: torch.Tensor) -> torch.Tensor:
    return ((x.mean(dim=1, keepdim=True) + 1.0) / 2.0).clamp(0.0, 1.0)


def train_vae(vae, steps: int, seed: int = 0, batch: int = 64, lr: float = 2e-3, kl_weight: float = 1e-4, log=print):
    """Reconstruction (L1 + L2) with a light KL term, on plain and styled training digits, so the
    latent space can express every style the LoRAs will ask for."""
    seed_everything(seed)
    images, labels = D.load_split("train")
    x, _, _ = all_styles(images, labels)
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    vae.train()
    for step in range(steps):
        cosine_lr(opt, step, steps, lr)
        target = to_rgb(x[torch.randint(0, len(x), (batch,), generator=gen)])
        posterior = vae.encode(target).latent_dist
        recon = vae.decode(posterior.sample(generator=gen)).sample
        kl = posterior.kl().mean() / posterior.mean[0].numel()
        loss = (recon - target).abs().mean() + (recon - target).pow(2).mean() + kl_weight * kl
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 100 == 0 or step == steps - 1:
            log(f"vae step {step}/{steps} loss {loss.item():.4f} kl {kl.item():.3f}")
    return vae.eval()


@torch.no_grad()
def encode(vae, images: torch.Tensor) -> torch.Tensor:
    """Unscaled posterior means of grey images."""
    return torch.cat([vae.encode(to_rgb(chunk)).latent_dist.mean for chunk in images.split(256)])


@torch.no_grad()
def decode(vae, latents: torch.Tensor) -> torch.Tensor:
    return torch.cat([from_rgb(vae.decode(chunk).sample) for chunk in latents.split(256)])


# ---- text encoder + UNet ----------------------------------------------------------------------

def token_ids(tokenizer, prompts: list[str]) -> torch.Tensor:
    return tokenizer(
        prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    ).input_ids


class EMA:
    """Exponential moving average of weights: diffusion samples are much cleaner from it."""

    def __init__(self, params, decay: float):
        self.params = list(params)
        self.shadow = [p.detach().clone() for p in self.params]
        self.decay = decay

    @torch.no_grad()
    def update(self, step: int) -> None:
        decay = min(self.decay, (1 + step) / (10 + step))  # short memory early on
        for s, p in zip(self.shadow, self.params):
            s.lerp_(p.detach(), 1.0 - decay)

    @torch.no_grad()
    def copy_to_model(self) -> None:
        for s, p in zip(self.shadow, self.params):
            p.copy_(s)


def diffusion_loss(unet, text_encoder, scheduler, latents, ids, gen) -> torch.Tensor:
    """The standard epsilon-prediction loss at uniformly drawn timesteps."""
    noise = torch.randn(latents.shape, generator=gen)
    t = torch.randint(0, scheduler.config.num_train_timesteps, (len(latents),), generator=gen)
    noisy = scheduler.add_noise(latents, noise, t)
    hidden = text_encoder(ids)[0]
    return F.mse_loss(unet(noisy, t, hidden).sample, noise)


def train_base(pipe, steps: int, seed: int = 0, batch: int = 128, lr: float = 1e-3, ema_decay: float = 0.999,
               drop_prompt: float = 0.1, log=print):
    """Text encoder and UNet from scratch on plain digits with prompts "a handwritten <digit>".
    A tenth of the prompts are dropped to "" so classifier-free guidance works."""
    from .build import make_train_scheduler

    seed_everything(seed)
    images, labels = D.load_split("train")
    latents = encode(pipe.vae, images) * pipe.vae.config.scaling_factor
    digit_ids = token_ids(pipe.tokenizer, [D.prompt(d) for d in range(10)])
    empty_ids = token_ids(pipe.tokenizer, [""])[0]
    scheduler = make_train_scheduler()
    unet, text_encoder = pipe.unet, pipe.text_encoder
    unet.train()
    text_encoder.train()
    params = list(unet.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=1e-4)
    ema = EMA(params, ema_decay)
    gen = torch.Generator().manual_seed(seed)
    for step in range(steps):
        cosine_lr(opt, step, steps, lr, warmup=100)
        idx = torch.randint(0, len(latents), (batch,), generator=gen)
        ids = digit_ids[labels[idx]].clone()
        ids[torch.rand(batch, generator=gen) < drop_prompt] = empty_ids
        loss = diffusion_loss(unet, text_encoder, scheduler, latents[idx], ids, gen)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        ema.update(step)
        if step % 100 == 0 or step == steps - 1:
            log(f"unet step {step}/{steps} loss {loss.item():.4f}")
    ema.copy_to_model()
    unet.eval()
    text_encoder.eval()
    return pipe



def update_report(path, section: str, values: dict, merge: bool = False) -> dict:
    """Read-modify-write one section of report.json, so each script owns its own numbers; with
    ``merge`` the section's other entries (e.g. styles not retrained in this run) are kept."""
    import json
    from pathlib import Path

    from ..outputs import write_text

    path = Path(path)
    report = json.loads(path.read_text()) if path.exists() else {}
    report[section] = {**report.get(section, {}), **values} if merge else values
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text(path, json.dumps(report, indent=2, sort_keys=True) + "\n")
    return report
