"""AUTOMATIC1111's LoRA loader (``extensions-builtin/Lora/networks.py`` ``load_network``,
``network*.py``), restated from v1.10 (July 2024; A1111 is unmaintained since); notes §3.

A1111 patches its own LDM/sgm modules, registered under their dotted paths with '.' → '_' (the
architecture's facts give those names per component). A key is split at its first '.'; the module
part goes through ``convert_diffusers_name_to_compvis`` (restated below) and is looked up; then
``q/k/v_proj`` are tried on the layer's MultiheadAttention, ``lora_unet`` → ``diffusion_model``
and ``lora_te1_text_model`` → ``0_transformer_text_model`` / ``transformer_text_model``. Keys that
match nothing are dropped silently. Each matched module's parameters must fit one module type,
else the whole file fails to load. An OpenCLIP layer's q, k, v, out are applied only when all four
are in the file. Scale: alpha / rows of down, else 1 (an explicit ``scale`` parameter, which
wins in A1111, is not a key this package reads).
"""

from __future__ import annotations

import re

from ..formats.archs import Architecture, ClientFacts
from ..formats.schemes.clientnames import A1111_OPENCLIP, layer_groups
from . import Application, Client, FileModule, FileView, Reading, lookup, pick
from .comfyui import lycoris_scale

_RESNET = {"conv1": "in_layers_2", "conv2": "out_layers_3", "norm1": "in_layers_0", "norm2": "out_layers_0",
           "time_emb_proj": "emb_layers_1", "conv_shortcut": "skip_connection"}
_OPENCLIP = (("mlp_fc1", "mlp_c_fc"), ("mlp_fc2", "mlp_c_proj"), ("self_attn", "attn"))
_PARTS = r"_(?P<kind>attentions|resnets)_(?P<layer>\d+)_(?P<rest>.+)"

# the parameters each module type needs (network_lora, network_hada, network_full; LoKr below)
_TYPES = ({"lora_up.weight", "lora_down.weight"}, {"lora_A.weight", "lora_B.weight"},
          {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"}, {"diff"})


def _openclip(rest: str) -> str:
    for old, new in _OPENCLIP:
        if old in rest:
            return rest.replace(old, new)
    return rest


def _block(place):
    """A kohya diffusers block name → A1111's (LDM) block and slot, resnet parts renamed."""
    def convert(m, is_sd2):
        kind, rest = m["kind"], m["rest"]
        inner = _RESNET.get(rest, rest) if kind == "resnets" else rest
        return f"diffusion_model_{place(int(m['block'] or 0), kind == 'attentions', int(m['layer']))}_{inner}"
    return convert


def _text(m, is_sd2):
    if is_sd2:
        return f"model_transformer_resblocks_{m[1]}_{_openclip(m[2])}"
    return f"transformer_text_model_encoder_layers_{m[1]}_{m[2]}"


# convert_diffusers_name_to_compvis, rule by rule in A1111's order (SD1's block layout throughout)
_RULES = tuple((re.compile(p), f) for p, f in (
    (r"lora_unet_conv_in(.*)", lambda m, sd2: f"diffusion_model_input_blocks_0_0{m[1]}"),
    (r"lora_unet_conv_out(.*)", lambda m, sd2: f"diffusion_model_out_2{m[1]}"),
    (r"lora_unet_time_embedding_linear_(\d+)(.*)", lambda m, sd2: f"diffusion_model_time_embed_{int(m[1]) * 2 - 2}{m[2]}"),
    (r"lora_unet_down_blocks_(?P<block>\d+)" + _PARTS, _block(lambda b, attn, i: f"input_blocks_{1 + b * 3 + i}_{int(attn)}")),
    (r"lora_unet_mid_block(?P<block>)" + _PARTS, _block(lambda b, attn, i: f"middle_block_{1 if attn else i * 2}")),
    (r"lora_unet_up_blocks_(?P<block>\d+)" + _PARTS, _block(lambda b, attn, i: f"output_blocks_{b * 3 + i}_{int(attn)}")),
    (r"lora_unet_down_blocks_(\d+)_downsamplers_0_conv", lambda m, sd2: f"diffusion_model_input_blocks_{3 + int(m[1]) * 3}_0_op"),
    (r"lora_unet_up_blocks_(\d+)_upsamplers_0_conv",
     lambda m, sd2: f"diffusion_model_output_blocks_{2 + int(m[1]) * 3}_{2 if int(m[1]) > 0 else 1}_conv"),
    (r"lora_te_text_model_encoder_layers_(\d+)_(.+)", _text),
    (r"lora_te2_text_model_encoder_layers_(\d+)_(.+)", lambda m, sd2: f"1_model_transformer_resblocks_{m[1]}_{_openclip(m[2])}"),
))


def to_compvis(key: str, is_sd2: bool) -> str:
    """``convert_diffusers_name_to_compvis``: kohya diffusers-style names → A1111 module names."""
    for pattern, convert in _RULES:
        m = pattern.match(key)
        if m:
            return convert(m, is_sd2)
    return key


class A1111(Client):
    def load(self, file: FileView, facts: ClientFacts) -> Reading:
        model = list(facts.model.items())
        # A1111 converts lora_te_ keys the SD2 way when 'model_transformer_resblocks' is registered
        is_sd2 = any(n.prefix == "model_" and n.scheme is A1111_OPENCLIP for _, n in model)
        owner = file.module_of()
        groups: dict[str, dict[str, str]] = {}  # A1111's module key → {parameter part: file key}
        resolved: dict[str, tuple[str, object]] = {}
        for key in file.keys:
            head, _, part = key.partition(".")
            found = self.resolve(file.arch, model, head, is_sd2, owner[key])
            if found is None:
                continue
            name, place = found
            groups.setdefault(name, {})[part] = key
            resolved[name] = place
        reading = Reading()
        for name, params in groups.items():
            if not self.accepts(set(params)):
                return Reading("rejected", f"module {name} has {', '.join(sorted(params))}, which no module type "
                                           "accepts: AssertionError, the file does not load")
        applied: dict[str, Application] = {}
        for name, params in groups.items():
            component, target = resolved[name]
            keys = set(params.values())
            m = owner[next(iter(keys))]
            applied[m.prefix] = self.application(m, component, target, params)
        for m in file.modules:
            reading.applications.append(applied.get(m.prefix) or Application(m, why="no A1111 module of that name"))
        self.together(file, facts, reading)
        return reading

    @staticmethod
    def accepts(params: set[str]) -> bool:
        """Whether some module type takes this parameter set (extra parameters are ignored)."""
        lokr = any(p in params for p in ("lokr_w1", "lokr_w1_a")) and any(p in params for p in ("lokr_w2", "lokr_w2_a"))
        return lokr or any(need <= params for need in _TYPES)

    def resolve(self, arch: Architecture, model, head: str, is_sd2: bool, m: FileModule):
        """The registered module a key's module part reaches, as (A1111 key, (component, target)).
        (The ``q/k/v_proj`` fallback onto a MultiheadAttention is in the facts' module names:
        A1111 files those parameters under the suffixed name.)"""
        attempts = [to_compvis(head, is_sd2)]
        if "lora_unet" in head:
            attempts.append(head.replace("lora_unet", "diffusion_model"))
        elif "lora_te1_text_model" in head:
            attempts += [head.replace("lora_te1_text_model", "0_transformer_text_model"),
                         head.replace("lora_te1_text_model", "transformer_text_model")]
        for name in attempts:
            found = pick(lookup(arch, model, name, m.exact), m)
            if found is not None:
                return name, found
        return None

    def application(self, m: FileModule, component: str, target, params: dict[str, str]) -> Application:
        full = "diff" in params  # only a full module applies its bias; next to a LoRA it is ignored
        used = tuple(k for part, k in params.items() if (part != "diff_b" or full) and not part.endswith(".bias"))
        if m.kind == "lora":
            scale = m.alpha / m.shapes["down"][0] if "alpha" in params else 1.0
        else:
            scale = lycoris_scale(m)
        return Application(m, component, target, scale, full and "diff_b" in params, used)

    def together(self, file: FileView, facts: ClientFacts, reading: Reading) -> None:
        """OpenCLIP attention: q, k, v, out of a layer applied only when all four are there."""
        for component, templates in facts.together.items():
            applied = [(a.target.members[0], a) for a in reading.applications
                       if a.target is not None and a.component == component]
            for layer, group in layer_groups(templates, applied).items():
                if len(group) < len(templates):
                    for a in group.values():
                        a.target = None
                        a.why = (f"A1111 applies layer {layer}'s attention only with all of q, k, v, out "
                                 f"({len(group)} of {len(templates)} in the file)")


CLIENT = A1111("a1111", "A1111", "AUTOMATIC1111/stable-diffusion-webui v1.10 (July 2024)")
