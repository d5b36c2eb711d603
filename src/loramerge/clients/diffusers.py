"""diffusers' ``load_lora_weights``, restated from diffusers 0.42.1 (peft 0.21.2, transformers 5);
notes §4. The architecture's facts name the loader (the pipeline's LoRA mixin):

- ``sd`` / ``sdxl`` (StableDiffusion[XL]LoraLoaderMixin): when every key starts with ``lora_unet_``,
  ``lora_te_``, ``lora_te1_`` or ``lora_te2_`` the kohya converter runs (SDXL: sgm blocks remapped
  first, and dropped when mixed with diffusers blocks); every other key then raises. Otherwise
  the file must be diffusers/PEFT, and a key without "lora" raises.
- ``sd3``: diffusers/PEFT names only (``transformer.``, ``text_encoder.``, ``text_encoder_2.``).
- ``flux``: any ``.lora_down.weight`` → the kohya converter (alpha folded into the factors, Flux.1's
  19/38 blocks and fixed ``linear1`` sizes, global modules and T5 dropped); else diffusers/PEFT with
  ``.alpha`` keys as network alphas.
- ``chroma``: ChromaPipeline runs Flux.1's loader; modelled for the transformer only (what it does
  with T5 text-encoder modules is not).
- ``dit``: the newer DiT pipelines (Qwen-Image, Z-Image, Lumina 2, HiDream, Wan, HunyuanVideo,
  LTX, Flux.2; notes §4.5), transformer only: a file all in ``transformer.`` PEFT keys without
  ``.alpha`` is loaded by PEFT; a file all in the spellings the facts list (each converter's
  verified cases: lora/lora_A factors and alphas only, no metadata) is converted with the
  alpha folded, onto the same modules; anything else is not modelled (unknown).

Every route ends in PEFT: keys under each loadable component's prefix, old spellings renamed,
a LoraConfig from ``lora_adapter_metadata`` verbatim or else from the tensors (most common rank
and alpha, the others as patterns that PEFT matches as dotted-suffix regexes — attention alphas
of kohya files are filed under names that match no module), then the modules named in the
config get LoRA layers. Scale = alpha / r of each layer, times what a converter folded in.
"""

from __future__ import annotations

import collections
import functools
import json
import math
import re
from dataclasses import dataclass

from ..formats import keymaps
from ..formats.archs import Architecture, ClientFacts
from ..formats.placement import NameIndex
from ..formats.schemes import Target
from . import Application, Client, FileModule, FileView, Reading, lookup, pick

LOADABLE = {"sd": ("unet", "text_encoder"), "sdxl": ("unet", "text_encoder", "text_encoder_2"),
            "sd3": ("transformer", "text_encoder", "text_encoder_2"), "flux": ("transformer", "text_encoder"),
            "chroma": ("transformer",), "dit": ("transformer",)}
# loaders modelled for these components only: a file with modules elsewhere (Chroma's T5, Wan 2.2's
# transformer_2, LTX-2's connectors) is reported as unknown, not as lost
MODELLED = {"chroma": ("transformer",), "dit": ("transformer",)}
KOHYA_PREFIXES = ("lora_te_", "lora_unet_", "lora_te1_", "lora_te2_")
TEXT_RANKED = (".q_proj", ".k_proj", ".v_proj", ".out_proj", ".fc1", ".fc2")


_SPELLING = {".lora_down.weight": "kohya", ".lora_A.weight": "peft"}  # down factor's suffix → Naming.style
_PEFT_SUFFIXES = (".lora_A.weight", ".lora_B.weight", ".lora_B.bias")


class Rejected(Exception):
    """diffusers raises: nothing is applied."""


@dataclass
class Key:
    """One tensor as it travels through diffusers' conversions."""

    name: str
    module: FileModule
    original: str
    scale: float = 1.0  # folded into the factors by a converter


def _transformers_flattens_clip() -> bool:
    """transformers ≥ 5 drops CLIPTextModel's ``text_model`` level (assumed when not installed)."""
    try:
        import transformers
    except ImportError:
        return True
    return int(transformers.__version__.split(".")[0]) >= 5


@functools.cache
def _model_index(arch: Architecture, component: str) -> NameIndex:
    names = set()
    for variant in arch.variants:
        names.update(keymaps.table(variant).get(component, {}))
    return NameIndex(names)


def _flat_clip(arch: Architecture, component: str) -> bool:
    classes = {cfg.get(component, {}).get("_class_name") for cfg in arch.variants.values()}
    return classes == {"CLIPTextModel"} and _transformers_flattens_clip()


# --------------------------------------------------------------------------------------------
# PEFT: LoraConfig and injection (diffusers loaders/peft.py, utils/peft_utils.py; peft)


def pattern_key(patterns, key: str) -> str | None:
    """peft.utils.other.get_pattern_key: the first pattern that is a dotted-suffix regex of key."""
    for p in patterns:
        if re.match(rf"(.*\.)?({p})$", key):
            return p
    return None


def peft_kwargs(ranks: dict[str, int], alphas: dict[str, float] | None, is_unet: bool, tensors: bool = False) -> dict:
    """diffusers' get_peft_kwargs: most common rank and alpha, the others as patterns. With
    ``tensors`` (the Flux loader keeps alphas as 0-d tensors, which count and hash by identity)
    the "most common" alpha is the first one, whenever there are two or more."""
    values = list(ranks.values())
    r = lora_alpha = values[0]
    rank_pattern: dict[str, int] = {}
    alpha_pattern: dict[str, float] = {}
    if len(set(values)) > 1:
        r = collections.Counter(values).most_common()[0][0]
        rank_pattern = {k.split(".lora_B.")[0]: v for k, v in ranks.items() if v != r}
        if not alphas:
            lora_alpha, alpha_pattern = r, dict(rank_pattern)  # alpha = rank: scale 1 everywhere
    if alphas:
        if len(alphas) > 1 if tensors else len(set(alphas.values())) > 1:
            values = list(alphas.values())
            lora_alpha = values[0] if tensors else collections.Counter(values).most_common()[0][0]
            odd = {k: v for k, v in alphas.items() if v != lora_alpha}
            if is_unet:
                alpha_pattern = {k.split(".lora_A.")[0].replace(".alpha", ""): v for k, v in odd.items()}
            else:
                alpha_pattern = {".".join(k.split(".down.")[0].split(".")[:-1]): v for k, v in odd.items()}
        else:
            lora_alpha = next(iter(alphas.values()))
    return {"r": r, "lora_alpha": lora_alpha, "rank_pattern": rank_pattern, "alpha_pattern": alpha_pattern,
            "target_modules": None}


def _targeted(targets, path: str) -> bool:
    if isinstance(targets, str):
        return re.fullmatch(targets, path) is not None
    return path in targets or any(path.endswith("." + t) for t in targets)


def inject(arch: Architecture, component: str, keys: list[Key], alphas: dict[str, float] | None,
           metadata: dict | None, text: bool, tensor_alphas: bool = False) -> list[Application]:
    """PEFT's reading of one component's keys (already stripped of the component prefix)."""
    flat = text and _flat_clip(arch, component)
    if flat:
        keys = [Key(k.name.removeprefix("text_model."), k.module, k.original, k.scale) for k in keys]
    by_name = {k.name: k for k in keys}
    index = _model_index(arch, component)

    def canonical(path: str) -> str:
        return "text_model." + path if flat and path.startswith(("encoder.", "embeddings.", "final_layer_norm")) else path

    modules = []  # (path, down key, up key) in the order their lora_B keys come
    for k in keys:
        if k.name.endswith(".lora_B.weight"):
            path = k.name[: -len(".lora_B.weight")]
            down = by_name.get(path + ".lora_A.weight")
            if down is not None:
                modules.append((path, down, k))
    ranks: dict[str, int] = {}
    if text:  # diffusers ranks only the text encoder's six projections, in the model's module order
        order = {n: i for i, n in enumerate(keymaps.table(next(iter(arch.variants)))[component])}
        for path, _, up in sorted(modules, key=lambda m: order.get(canonical(m[0]), len(order))):
            if path.endswith(TEXT_RANKED):
                ranks[f"{path}.lora_B.weight"] = up.module.rank
    else:
        ranks = {f"^{path}.lora_B.weight": up.module.rank for path, _, up in modules}
    if metadata is not None:
        config = dict(metadata)
    elif ranks:
        config = peft_kwargs(ranks, alphas, not text, tensor_alphas)
        config["target_modules"] = sorted({k.name.split(".lora")[0] for k in keys})
    else:
        raise Rejected(f"no {component} key diffusers can take a rank from (IndexError): the load fails")
    r0, a0 = config.get("r", 8), config.get("lora_alpha", 8)
    rank_pattern, alpha_pattern = config.get("rank_pattern") or {}, config.get("alpha_pattern") or {}
    targets = config.get("target_modules") or []
    bias_on = config.get("lora_bias", any(k.name.endswith(".lora_B.bias") for k in keys))
    paths = [n.removeprefix("text_model.") if flat else n for n in index.exact]
    if not any(_targeted(targets, p) for p in paths):
        raise Rejected(f"PEFT finds none of the adapter's target modules in {component} "
                       "(NoMatchingPeftModuleError): the load fails")
    out = []
    for path, down, up in modules:
        m = up.module
        name = canonical(path)
        if not index.dotted(name) and (m.exact or index.dotted(name) is None):
            out.append(Application(m, why=f"diffusers: no module {component}.{path} ('unexpected keys')"))
            continue
        if not _targeted(targets, path):
            out.append(Application(m, why=f"diffusers: {path} is not in the adapter's target_modules"))
            continue
        rk = pattern_key(rank_pattern, path)
        r = rank_pattern[rk] if rk is not None else r0
        if r != m.rank:
            raise Rejected(f"the adapter config gives {component}.{path} rank {r} but its tensors have rank "
                           f"{m.rank}: size mismatch, the load fails")
        ak = pattern_key(alpha_pattern, path)
        alpha = alpha_pattern[ak] if ak is not None else a0
        scaling = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
        bias_key = by_name.get(path + ".lora_B.bias")
        used = [*down.original.split("\n"), up.original] + ([bias_key.original] if bias_key is not None and bias_on else [])
        out.append(Application(m, component, Target(name, (name,)), scaling * up.scale * down.scale,
                               bias_key is not None and bias_on, tuple(used)))
    return out


# --------------------------------------------------------------------------------------------
# text encoders (lora_base._load_lora_into_text_encoder; utils/state_dict_utils)

_ALWAYS = ((".processor.", "."),)
_UNET_TO_PEFT = ((".to_out_lora.up", ".to_out.0.lora_B"), (".to_out_lora.down", ".to_out.0.lora_A"),
                 (".to_q_lora.down", ".to_q.lora_A"), (".to_q_lora.up", ".to_q.lora_B"),
                 (".to_k_lora.down", ".to_k.lora_A"), (".to_k_lora.up", ".to_k.lora_B"),
                 (".to_v_lora.down", ".to_v.lora_A"), (".to_v_lora.up", ".to_v.lora_B"),
                 (".lora.up", ".lora_B"), (".lora.down", ".lora_A"))
_PROJ = ("q", "k", "v", "out")
_OLD_TO_DIFFUSERS = tuple((f".to_{x}_lora.{d}", f".{x}_proj.lora_linear_layer.{d}") for x in _PROJ
                          for d in ("up", "down"))
_PEFT_TO_DIFFUSERS = tuple((f".{x}_proj.lora_{ab}", f".{x}_proj.lora_linear_layer.{d}") for x in _PROJ
                           for ab, d in (("B", "up"), ("A", "down"))) + tuple(
    (f"{t}.lora_{ab}", f"{t}.lora.{d}") for t in ("to_k", "to_q", "to_v", "to_out.0")
    for ab, d in (("A", "down"), ("B", "up")))
_DIFFUSERS_TO_PEFT = tuple((f".{x}_proj.lora_linear_layer.{d}", f".{x}_proj.lora_{ab}") for x in _PROJ
                           for d, ab in (("up", "B"), ("down", "A"))) + (
    (".lora_linear_layer.up", ".lora_B"), (".lora_linear_layer.down", ".lora_A"),
    ("text_projection.lora.down.weight", "text_projection.lora_A.weight"),
    ("text_projection.lora.up.weight", "text_projection.lora_B.weight"))
_OLD_TO_PEFT = tuple((f".to_{x}_lora.{d}", f".{x}_proj.lora_{ab}") for x in _PROJ
                     for d, ab in (("up", "B"), ("down", "A"))) + (
    (".lora_linear_layer.up", ".lora_B"), (".lora_linear_layer.down", ".lora_A"))


def _convert(keys: list[Key], mapping) -> list[Key]:
    out = []
    for k in keys:
        name = k.name
        for old, new in _ALWAYS:
            name = name.replace(old, new)
        for old, new in mapping:
            if old in name:
                name = name.replace(old, new)
                break
        out.append(Key(name, k.module, k.original, k.scale))
    return out


def text_to_peft(keys: list[Key]) -> list[Key]:
    """convert_state_dict_to_diffusers then convert_state_dict_to_peft (types inferred from the keys)."""
    names = [k.name for k in keys]
    if any("to_out_lora" in n for n in names):
        keys = _convert(keys, _OLD_TO_DIFFUSERS)
    elif any(".lora_A.weight" in n for n in names):
        keys = _convert(keys, _PEFT_TO_DIFFUSERS)
    elif not any("lora_linear_layer" in n for n in names):
        raise Rejected("the text-encoder keys fit no state-dict type diffusers knows "
                       "('Could not automatically infer state dict type')")
    names = [k.name for k in keys]
    if any("to_out_lora" in n for n in names):
        return _convert(keys, _OLD_TO_PEFT)
    if any("lora_linear_layer" in n for n in names):
        return _convert(keys, _DIFFUSERS_TO_PEFT)
    raise Rejected("the text-encoder keys fit no state-dict type diffusers knows "
                   "('Could not automatically infer state dict type')")


def load_component(arch, component: str, keys: list[Key], alphas, metadata, text: bool,
                   tensor_alphas: bool = False) -> list[Application]:
    prefix = component + "."
    sub = [Key(k.name[len(prefix):], k.module, k.original, k.scale) for k in keys if k.name.startswith(prefix)]
    if not sub:
        return []
    sub_alphas = None
    if alphas is not None:
        sub_alphas = {k[len(prefix):]: v for k, v in alphas.items() if k.split(".")[0] == component}
    sub_meta = None
    if metadata is not None:
        sub_meta = {k[len(prefix):]: v for k, v in metadata.items() if k.startswith(prefix)}
    if text:
        sub = text_to_peft(sub)
    elif "lora_A" not in sub[0].name:
        sub = _convert(sub, _UNET_TO_PEFT)
    return inject(arch, component, sub, sub_alphas, sub_meta, text, tensor_alphas)


# --------------------------------------------------------------------------------------------
# the kohya converter of the SD loaders (lora_conversion_utils)

_UNET_RENAMES = (
    ("input.blocks.0.0", "conv_in"), ("out.2", "conv_out"), ("input.blocks", "down_blocks"),
    ("down.blocks", "down_blocks"), ("middle.block", "mid_block"), ("mid.block", "mid_block"),
    ("output.blocks", "up_blocks"), ("up.blocks", "up_blocks"), ("transformer.blocks", "transformer_blocks"),
    ("to.q.lora", "to_q_lora"), ("to.k.lora", "to_k_lora"), ("to.v.lora", "to_v_lora"),
    ("to.out.0.lora", "to_out_lora"), ("proj.in", "proj_in"), ("proj.out", "proj_out"),
    ("emb.layers", "time_emb_proj"), ("conv.in", "conv_in"), ("conv.out", "conv_out"),
    ("time.embed.0", "time_embedding.linear_1"), ("time.embed.2", "time_embedding.linear_2"),
    ("label.emb.0.0", "add_embedding.linear_1"), ("label.emb.0.2", "add_embedding.linear_2"),
    ("time.embedding.linear.1", "time_embedding.linear_1"), ("time.embedding.linear.2", "time_embedding.linear_2"),
)


def unet_key(key: str) -> str:
    """_convert_unet_lora_key: a kohya UNet key → diffusers' intermediate name."""
    n = key.replace("lora_unet_", "").replace("_", ".")
    for old, new in _UNET_RENAMES:
        n = n.replace(old, new)
    if "emb" in n and "time.emb.proj" not in n:
        n = re.sub(r"\.\d+(?=\D*$)", "", n, count=1)
    if ".in." in n:
        n = n.replace("in.layers.2", "conv1")
    if ".out." in n:
        n = n.replace("out.layers.3", "conv2")
    if "downsamplers" in n or "upsamplers" in n:
        n = n.replace("op", "conv")
    if "skip" in n:
        n = n.replace("skip.connection", "conv_shortcut")
    if "time.emb.proj" in n:
        n = n.replace("time.emb.proj", "time_emb_proj")
    if "conv.shortcut" in n:
        n = n.replace("conv.shortcut", "conv_shortcut")
    if "transformer_blocks" in n and ("attn1" in n or "attn2" in n):
        n = n.replace("attn1", "attn1.processor").replace("attn2", "attn2.processor")
    return n


def text_key(key: str, lora_name: str) -> str:
    """_convert_text_encoder_lora_key."""
    drop = ("lora_te_" if lora_name.startswith("lora_te_") else "lora_te1_") \
        if lora_name.startswith(("lora_te_", "lora_te1_")) else "lora_te2_"
    n = key.replace(drop, "").replace("_", ".")
    for old, new in (("text.model", "text_model"), ("self.attn", "self_attn"), ("q.proj.lora", "to_q_lora"),
                     ("k.proj.lora", "to_k_lora"), ("v.proj.lora", "to_v_lora"), ("out.proj.lora", "to_out_lora"),
                     ("text.projection", "text_projection")):
        n = n.replace(old, new)
    if "self_attn" not in n and "text_projection" not in n and "mlp" in n:
        n = n.replace(".lora.", ".lora_linear_layer.")
    return n


def sgm_to_diffusers_keys(keys: list[Key], layers_per_block: int) -> list[Key]:
    """_maybe_map_sgm_blocks_to_diffusers (SDXL pipelines), on flattened kohya keys."""
    sgm, plain = ("input_blocks", "middle_block", "output_blocks"), ("down_blocks", "mid_block", "up_blocks")
    has_sgm = any(any(p in k.name for p in sgm) for k in keys)
    has_plain = any(not any(p in k.name for p in sgm) and any(p in k.name for p in plain) for k in keys)
    if has_sgm and has_plain:
        return [k for k in keys if not any(p in k.name for p in sgm)]
    if not has_sgm:
        return keys
    inner = ("resnets", "attentions", "upsamplers")
    out = []
    for k in keys:
        parts = k.name.split("_")
        if "text" in k.name or not any(p in k.name for p in sgm) or "input_blocks_0_0" in k.name:
            out.append(k)
            continue
        i = int(parts[:5][-1])
        if "input_blocks" in k.name:
            block, layer = (i - 1) // (layers_per_block + 1), (i - 1) % (layers_per_block + 1)
            kind = inner[int(parts[5])] if "op" not in k.name else "downsamplers"
            new = parts[:4] + [str(block), kind, str(layer) if "op" not in k.name else "0"] + parts[6:]
        elif "middle_block" in k.name:
            if i > 2:
                raise Rejected(f"invalid middle block id {i}")
            new = parts[:4] + [["resnets", "0"], ["attentions", "0"], ["resnets", "1"]][i] + parts[5:]
        else:
            block, layer = i // (layers_per_block + 1), i % (layers_per_block + 1)
            j = int(parts[5])
            new = parts[:4] + [str(block), inner[j], str(layer) if j < 2 else "0"] + parts[6:]
        out.append(Key("_".join(new), k.module, k.original, k.scale))
    return out


def kohya_sd(keys: list[Key]) -> tuple[list[Key], dict[str, float], set[str]]:
    """_convert_non_diffusers_lora_to_diffusers: kohya keys → component-prefixed diffusers keys,
    network alphas under diffusers' names, and the alpha keys taken."""
    left = {k.name: k for k in keys}
    out, alphas, taken = [], {}, set()
    for k in keys:
        if not k.name.endswith("lora_down.weight"):
            continue
        lora_name = k.name.split(".")[0]
        up = left.get(lora_name + ".lora_up.weight")
        if up is None:
            raise Rejected(f"{lora_name}.lora_up.weight is missing (KeyError)")
        if lora_name.startswith("lora_unet_"):
            name, component = unet_key(k.name), "unet"
        elif lora_name.startswith(("lora_te_", "lora_te1_", "lora_te2_")):
            name = text_key(k.name, lora_name)
            component = "text_encoder_2" if lora_name.startswith("lora_te2_") else "text_encoder"
        else:
            continue
        del left[k.name], left[up.name]
        out += [Key(f"{component}.{name}", k.module, k.original),
                Key(f"{component}.{name.replace('.down.', '.up.')}", up.module, up.original)]
        alpha = left.pop(lora_name + ".alpha", None)
        if alpha is not None:
            prefix = "unet." if lora_name.startswith("lora_unet_") else (
                "text_encoder." if lora_name.startswith(("lora_te_", "lora_te1_")) else "text_encoder_2.")
            alphas[prefix + name.split(".lora.")[0] + ".alpha"] = alpha.module.alpha
            taken.add(alpha.original)
    if left:
        shown = ", ".join(list(left)[:4])
        raise Rejected(f"keys left after the kohya conversion ({shown}): 'The following keys have not been "
                       "correctly renamed', the load fails")
    return out, alphas, taken


# --------------------------------------------------------------------------------------------
# the kohya converter of the Flux loader (Flux.1's sizes are in diffusers' code)

FLUX_DOUBLE, FLUX_SINGLE, FLUX_LINEAR1_ROWS = 19, 38, 3 * 3072 + 12288
_FLUX_BLOCK = re.compile(r"lora_unet_(double|single)_blocks_(\d+)_(img_attn_proj|img_attn_qkv|img_mlp_0|img_mlp_2|"
                         r"img_mod_lin|txt_attn_proj|txt_attn_qkv|txt_mlp_0|txt_mlp_2|txt_mod_lin|linear1|linear2|"
                         r"modulation_lin)$")
_FLUX_GLOBAL = re.compile(r"lora_unet_(guidance_in|img_in|txt_in|time_in|vector_in|final_layer)_")


def kohya_flux(keys: list[Key], reading: Reading) -> list[Key]:
    """_convert_kohya_flux_lora_to_diffusers → transformer./text_encoder. keys, alphas folded."""
    names = [k.name for k in keys]
    if any(n.startswith("transformer.") for n in names):
        reading.notes.append("diffusers keeps only the transformer. keys of a file that also has kohya keys")
        return [Key(k.name.replace("lora_down.weight", "lora_A.weight").replace("lora_up.weight", "lora_B.weight"),
                    k.module, k.original) for k in keys if k.name.startswith("transformer.")]
    if any(n.startswith("lora_transformer_") and ("lora_down" in n or "lora_up" in n or "alpha" in n) for n in names):
        return _flux_mixture(keys)
    kept = []
    for k in keys:
        name = k.name.replace("diffusion_model.", "lora_unet_").replace("text_encoders.clip_l.transformer.", "lora_te_")
        if ("position_embedding" in name or name.startswith("text_encoders.t5xxl.transformer.") or ".diff_b" in name
                or (".norm" in name and ".diff" in name)):
            continue
        if not name.startswith(("lora_unet_", "lora_te_", "lora_te1_")) or "text_projection" in name:
            continue
        module, _, part = name.partition(".")
        if part not in ("lora_down.weight", "lora_up.weight", "alpha"):  # _custom_replace flattens the rest
            module, part = name.rsplit(".", 2)[0], ".".join(name.rsplit(".", 2)[1:])
        kept.append(Key(module.replace(".", "_") + "." + part, k.module, k.original))
    out, left, dropped = [], {k.name: k for k in kept}, []
    for k in kept:
        module, _, part = k.name.partition(".")
        if part != "lora_down.weight" or not module.startswith("lora_unet_"):
            continue
        block = _FLUX_BLOCK.match(module)
        if (not block and not _FLUX_GLOBAL.match(module + "_")) or (
                block and int(block[2]) >= (FLUX_DOUBLE if block[1] == "double" else FLUX_SINGLE)):
            continue  # left over: raises below
        up = left.pop(module + ".lora_up.weight", None)
        alpha = left.pop(module + ".alpha", None)
        del left[k.name]
        if up is None:
            raise Rejected(f"{module}.lora_up.weight is missing")
        if block and block[3] == "linear1" and k.module.shapes["up"][0] != FLUX_LINEAR1_ROWS:
            raise Rejected(f"diffusers splits {module} at Flux.1's sizes (3072, 3072, 3072, 12288); this file's has "
                           f"{k.module.shapes['up'][0]} rows: size mismatch, the load fails")
        rank = k.module.shapes["down"][0]
        scale = (alpha.module.alpha if alpha is not None else rank) / rank
        used = [x.original for x in (k, up, alpha) if x is not None]
        if block:
            out.append(Key("transformer.<kohya>", k.module, "\n".join(used), scale))
        else:
            dropped.append(module)
            out.append(Key("<dropped>", k.module, "\n".join(used)))
    if dropped:
        reading.notes.append(f"diffusers names {', '.join(dropped)} without the transformer. prefix: dropped silently")
    leftovers = [n for n in left if not n.startswith("lora_te")]
    if leftovers:
        raise Rejected(f"keys the Flux converter does not handle ({', '.join(leftovers[:4])}): "
                       "'Incompatible keys detected', the load fails")
    for name, k in list(left.items()):
        module, _, part = name.partition(".")
        if part != "lora_down.weight" or not module.startswith(("lora_te_", "lora_te1_")):
            continue
        up = left.pop(module + ".lora_up.weight")
        alpha = left.pop(module + ".alpha", None)
        del left[name]
        scale = alpha.module.alpha / k.module.shapes["down"][0] if alpha is not None else 1.0
        te = text_key(name, module)
        down = "\n".join(x.original for x in (k, alpha) if x is not None)
        out += [Key(f"text_encoder.{te}", k.module, down, scale),
                Key(f"text_encoder.{te.replace('.down.', '.up.')}", up.module, up.original)]
    return out


def _flux_mixture(keys: list[Key]) -> list[Key]:
    """OneTrainer's lora_transformer_ files: alphas folded, lora_unet_ keys dropped."""
    out = []
    names = {k.name: k for k in keys}
    for k in keys:
        module, _, part = k.name.partition(".")
        if module.startswith("lora_unet_"):
            continue
        if not module.startswith(("lora_transformer_", "lora_te1_")):
            raise Rejected(f"{k.name} in a OneTrainer Flux file: AssertionError, the load fails")
        if part != "lora_down.weight":
            continue
        alpha = names.get(module + ".alpha")
        if alpha is None:
            raise Rejected(f"{module}.alpha is missing (KeyError): the load fails")
        scale = alpha.module.alpha / k.module.shapes["down"][0]
        up = names[module + ".lora_up.weight"]
        out.append(Key("transformer.<kohya>" if module.startswith("lora_transformer_") else "text_encoder.<kohya>",
                       k.module, "\n".join((k.original, up.original, alpha.original)), scale))
    return out


# --------------------------------------------------------------------------------------------


class Diffusers(Client):
    def load(self, file: FileView, facts: ClientFacts) -> Reading:
        owner = file.module_of()
        keys = [Key(k, owner[k], k) for k in file.keys if "dora_scale" not in k]
        meta = None
        if "lora_adapter_metadata" in file.metadata:
            try:
                meta = json.loads(file.metadata["lora_adapter_metadata"])
            except json.JSONDecodeError:
                return Reading("rejected", "lora_adapter_metadata is not JSON: the load fails")
        reading = Reading()
        try:
            if facts.loader in ("sd", "sdxl"):
                apps = self.sd(file, facts, keys, meta)
            elif facts.loader == "sd3":
                apps = self.peft_only(file, facts, keys, meta)
            elif facts.loader not in LOADABLE:
                return Reading("unknown", f"diffusers loader {facts.loader!r} is not modelled")
            elif facts.loader in MODELLED and (other := sorted(
                    {m.component for m in file.modules} - set(MODELLED[facts.loader]))):
                return Reading("unknown", f"what diffusers does with {' and '.join(other)} LoRA modules of "
                                          f"{file.arch.label} is not modelled")
            elif facts.loader in ("flux", "chroma"):
                apps = self.flux(file, facts, keys, meta, reading)
            else:
                apps = self.dit(file, facts, keys, meta)
                if apps is None:
                    return Reading("unknown", f"diffusers' conversion of this {file.arch.label} file is not modelled "
                                              "(only transformer. PEFT files and the converted spellings verified "
                                              "against diffusers are)")
        except Rejected as exc:
            return Reading("rejected", str(exc))
        reading.applications = self.complete(file, apps)
        return reading

    @staticmethod
    def complete(file: FileView, apps: list[Application]) -> list[Application]:
        """One application per file module (modules no component took are not applied)."""
        got = {a.module.prefix: a for a in apps}
        return [got.get(m.prefix) or Application(m, why="diffusers: no loadable component takes this key")
                for m in file.modules]

    def components(self, file: FileView, facts: ClientFacts) -> list[str]:
        return [c for c in LOADABLE[facts.loader] if file.arch.component(c) is not None]

    def sd(self, file: FileView, facts: ClientFacts, keys: list[Key], meta) -> list[Application]:
        alphas = None
        if all(k.name.startswith(KOHYA_PREFIXES) for k in keys):
            if facts.loader == "sdxl":
                unet = next(iter(file.arch.variants.values()))["unet"]
                keys = sgm_to_diffusers_keys(keys, unet.get("layers_per_block", 2))
            keys, alphas, taken = kohya_sd(keys)
            return self.components_load(file, facts, keys, alphas, meta, taken)
        return self.peft_only(file, facts, keys, meta)

    def peft_only(self, file: FileView, facts: ClientFacts, keys: list[Key], meta) -> list[Application]:
        odd = [k.name for k in keys if "lora" not in k.name]
        if odd:
            raise Rejected(f"key {odd[0]!r} has no 'lora' in it: 'Invalid LoRA checkpoint', the load fails")
        return self.components_load(file, facts, keys, None, meta)

    def components_load(self, file, facts, keys, alphas, meta, taken=frozenset(), tensor_alphas=False):
        """PEFT loading of every loadable component; ``taken``: alpha keys read as network alphas."""
        if alphas and meta:
            raise Rejected("the file has both alphas and lora_adapter_metadata: 'Both `network_alphas` and "
                           "`metadata` cannot be specified', the load fails")
        apps = []
        for component in self.components(file, facts):
            apps += load_component(file.arch, component, keys, alphas, meta, component != file.arch.denoiser,
                                   tensor_alphas)
        for app in apps:
            alpha = app.module.keys.get("alpha")
            if app.target is not None and alpha in taken:
                app.used = app.used + (alpha,)
        return apps

    def dit(self, file: FileView, facts: ClientFacts, keys: list[Key], meta) -> list[Application] | None:
        """The 'dit' loader; None where what diffusers does is not modelled."""
        # diffusers names under transformer. in PEFT spelling trigger no converter: PEFT as is
        if (all(k.name.startswith("transformer.") and k.name.endswith(_PEFT_SUFFIXES) for k in keys)
                and all(m.label == "diffusers" for m in file.modules)):
            return self.peft_only(file, facts, keys, meta)
        converted = [(c, n) for c, names in facts.names.items() for n in names]
        if meta is not None or not converted:
            return None
        apps, spellings = [], set()
        for m in file.modules:
            spelled = _SPELLING.get(m.suffix("down")) if "down" in m.keys else None
            if m.kind != "lora" or set(m.keys) - {"down", "up", "alpha"} or spelled is None:
                return None
            if spelled == "peft" and m.alpha is not None:  # lora_A/lora_B with .alpha: not verified everywhere
                return None
            mine = [(c, n) for c, n in converted if n.style == spelled and m.prefix.startswith(n.prefix)]
            if pick(lookup(file.arch, mine, m.prefix, m.exact), m) != (m.component, m.target):
                return None
            spellings.add(mine[0][1].prefix)
            if len(spellings) > 1:  # one converted spelling per file is what was verified
                return None
            # the converter folds alpha / rank into the factors (alpha = rank when there is none)
            scale = m.alpha / m.rank if m.alpha is not None else 1.0
            apps.append(Application(m, m.component, m.target, scale, False, tuple(m.keys.values())))
        return apps

    def flux(self, file: FileView, facts: ClientFacts, keys: list[Key], meta, reading: Reading) -> list[Application]:
        names = [k.name for k in keys]
        if any(".lora_down.weight" in n for n in names):
            converted = kohya_flux(keys, reading)
            apps = []
            for k in converted:
                if k.name in ("transformer.<kohya>", "text_encoder.<kohya>"):
                    m = k.module
                    component = "transformer" if k.name.startswith("transformer") else "text_encoder"
                    apps.append(Application(m, component, m.target, k.scale, False, tuple(k.original.split("\n"))))
                elif k.name == "<dropped>":
                    apps.append(Application(k.module, why="diffusers drops kohya Flux modules outside the blocks",
                                            used=()))
            plain = [k for k in converted if "<" not in k.name]
            return apps + self.components_load(file, facts, plain, None, None)
        if any("processor" in n for n in names) or any("base_model" in n for n in names):
            raise Rejected("diffusers converts this file as an XLabs / fal Kontext LoRA: not modelled here")
        alphas = {k.name: k.module.alpha for k in keys if "alpha" in k.name}
        rest = [k for k in keys if "alpha" not in k.name]
        if not any("lora" in k.name for k in rest):
            raise Rejected("no key has 'lora' in it: 'Invalid LoRA checkpoint', the load fails")
        return self.components_load(file, facts, rest, alphas or None, meta, set(alphas), tensor_alphas=True)


CLIENT = Diffusers("diffusers", "diffusers", "diffusers 0.42.1 (peft 0.21.2, transformers 5.24)")
