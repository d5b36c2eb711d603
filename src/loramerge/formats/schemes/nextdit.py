"""Alpha-VLLM's NextDiT names (Lumina-Image-2.0 and Z-Image original checkpoints, ComfyUI,
kohya sd-scripts, diffusion-pipe) ↔ diffusers.

Both models keep their blocks in ``layers``, ``noise_refiner`` and ``context_refiner`` (Z-Image
Omni adds ``siglip_refiner``) and fuse attention q, k, v into one ``attention.qkv`` Linear whose
rows are [q; k; v]:
- Lumina 2 uses grouped-query attention: q has n_heads·head_dim rows, k and v n_kv_heads·head_dim
  each (24:8:8 heads, 2304:768:768 rows); diffusers renames nearly everything (``attn.*``,
  ``feed_forward.linear_1..3``, ``norm1.linear``, ``time_caption_embed.*``, ``norm_out.*``).
- Z-Image has as many kv heads as heads (equal thirds) and keeps the original names except the
  fused attention, ``attention.out`` and the patch-size-keyed embedder and final layer
  (``all_x_embedder.2-1``, ``all_final_layer.2-1``); everything else passes through.
Neither model needs a (shift, scale) swap: diffusers keeps the original chunk order.
"""

from __future__ import annotations

import re

from . import Identity, Rule, RuleScheme
from .diffusers import DIFFUSERS


def _attention(blocks: tuple[str, ...], attn: str, projections: tuple[str, str, str, str],
               ratios: tuple[int, int, int] | None) -> list[Rule]:
    q, k, v, out = projections
    rules = []
    for block in blocks:
        b = block + ".{i}."
        rules.append(Rule(b + "attention.qkv", (b + f"{attn}.{q}", b + f"{attn}.{k}", b + f"{attn}.{v}"), ratios))
        rules.append(Rule(b + "attention.out", (b + f"{attn}.{out}",)))
    return rules


def lumina_scheme(heads: int = 24, kv_heads: int = 8) -> RuleScheme:
    """Lumina-Image-2.0: q:k:v rows = heads : kv_heads : kv_heads."""
    blocks = ("layers", "noise_refiner", "context_refiner")
    rules = _attention(blocks, "attn", ("to_q", "to_k", "to_v", "to_out.0"), (heads, kv_heads, kv_heads))
    for block in blocks:
        b = block + ".{i}."
        rules += [Rule(b + f"feed_forward.w{n}", (b + f"feed_forward.linear_{n}",)) for n in (1, 2, 3)]
    for block in ("layers", "noise_refiner"):  # the context refiner is not modulated
        rules.append(Rule(block + ".{i}.adaLN_modulation.1", (block + ".{i}.norm1.linear",)))
    rules += [
        Rule("x_embedder", ("x_embedder",)),
        Rule("t_embedder.mlp.0", ("time_caption_embed.timestep_embedder.linear_1",)),
        Rule("t_embedder.mlp.2", ("time_caption_embed.timestep_embedder.linear_2",)),
        Rule("cap_embedder.1", ("time_caption_embed.caption_embedder.1",)),
        Rule("final_layer.adaLN_modulation.1", ("norm_out.linear_1",)),
        Rule("final_layer.linear", ("norm_out.linear_2",)),
    ]
    return RuleScheme("nextdit-lumina2", rules)


def zimage_scheme(patch: str = "2-1") -> RuleScheme:
    """Z-Image (ComfyUI's NextDiT layout); ``patch`` keys diffusers' per-patch-size ModuleDicts."""
    blocks = ("layers", "noise_refiner", "context_refiner", "siglip_refiner")
    rules = _attention(blocks, "attention", ("to_q", "to_k", "to_v", "to_out.0"), None)
    rules += [
        Rule("x_embedder", (f"all_x_embedder.{patch}",)),
        Rule("final_layer.linear", (f"all_final_layer.{patch}.linear",)),
        Rule("final_layer.adaLN_modulation.1", (f"all_final_layer.{patch}.adaLN_modulation.1",)),
    ]
    return RuleScheme("nextdit-zimage", rules, passthrough=True)


LUMINA2 = lumina_scheme()
ZIMAGE = zimage_scheme()


def dotted_projection(name: str) -> str | None:
    """Some Z-Image trainers ("Anime-Z", per diffusers' converter) dot the projection names:
    'attention.to.q' → 'attention.to_q'."""
    fixed = re.sub(r"\.attention\.to\.([qkv])$", r".attention.to_\1", name)
    return fixed if fixed != name else None


ZIMAGE_DIFFUSERS = Identity("diffusers", (*DIFFUSERS.fixes, dotted_projection))
