"""Generate the two small example LoRAs bundled with the package (deterministic).

Both target the cross-attention key/value projections of the real Stable Diffusion 1.5 UNet
(attn2.to_k / attn2.to_v, 32 modules), with random factors: "style" in kohya format (rank 8,
alpha 4, fp16) and "subject" in diffusers format (rank 4, alpha 4, fp16).
Run: python scripts/make_examples.py
"""

import re
from pathlib import Path

import torch

import loramerge  # noqa: E402
from loramerge.synthetic import attention_targets, random_lora

OUT = Path(__file__).resolve().parents[1] / "src" / "loramerge" / "examples"


def main() -> None:
    targets = {k: v for k, v in attention_targets("sd1", ("unet",)).items() if re.search(r"attn2\.to_[kv]$", k[1])}
    style = random_lora("sd1", targets, rank=8, alpha=4, seed=1, dtype=torch.float16)
    subject = random_lora("sd1", targets, rank=4, alpha=4, seed=2, dtype=torch.float16)
    meta = {"modelspec.date": "2026-11-29T00:00:00"}
    loramerge.save(style, OUT / "style.safetensors", format="kohya", metadata={**meta, "modelspec.title": "example style"})
    loramerge.save(subject, OUT / "subject.safetensors", format="diffusers", metadata={**meta, "modelspec.title": "example subject"})
    for p in sorted(OUT.glob("*.safetensors")):
        print(p, p.stat().st_size)


if __name__ == "__main__":
    main()
