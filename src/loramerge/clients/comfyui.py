"""ComfyUI's LoRA loader (``comfy/lora.py`` ``load_lora``, ``model_lora_keys_unet/clip``,
``comfy/weight_adapter``), restated from Comfy-Org/ComfyUI a125cd8 (2025-10-12); notes §1.

ComfyUI never parses a key: it lists candidate module keys for the loaded model's own
parameters and looks each up in the file. Every denoiser parameter gets ``lora_unet_`` + its
flattened native name and ``diffusion_model.`` + its native name (the single-file checkpoint's
names, or the facts' ``native`` where ComfyUI's model differs); the architecture's facts add
the rest (diffusers spellings, text encoders). A candidate's keys are taken in the LoRA spellings
below (first match wins), plus ``.alpha`` and ``.diff_b``; scale = alpha / rows of the down factor
when ``.alpha`` exists, else 1 — header metadata is never read. Keys no candidate takes are logged
("lora key not loaded") and loading goes on.
"""

from __future__ import annotations

from ..formats.archs import Architecture, ClientFacts, Naming
from . import Application, Client, FileModule, FileView, Reading, lookup, native_scheme, pick

# (up, down) spellings after the module key, in the order ComfyUI tries them
LORA_SPELLINGS = (
    (".lora_up.weight", ".lora_down.weight"),
    ("_lora.up.weight", "_lora.down.weight"),
    (".lora_B.weight", ".lora_A.weight"),
    (".lora.up.weight", ".lora.down.weight"),
    (".lora_linear_layer.up.weight", ".lora_linear_layer.down.weight"),
    (".lora_B.default.weight", ".lora_A.default.weight"),
)
MID_WITH = ".lora_up.weight"  # lora_mid (Tucker) is read only next to this spelling


class ComfyUI(Client):
    spellings = LORA_SPELLINGS
    leftover_limit: int | None = None  # Forge: more unused keys than this and the file is ignored

    def namings(self, arch: Architecture, facts: ClientFacts) -> list[tuple[str, Naming]]:
        out = []
        denoiser = facts.native or native_scheme(arch, arch.denoiser)
        if denoiser is not None:  # every denoiser parameter, for every model
            out += [(arch.denoiser, Naming("lora_unet_", denoiser, flat=True)),
                    (arch.denoiser, Naming("diffusion_model.", denoiser))]
        for component, names in facts.names.items():
            out += [(component, n) for n in names]
        return out

    def load(self, file: FileView, facts: ClientFacts) -> Reading:
        namings = self.namings(file.arch, facts)
        reading = Reading()
        for m in file.modules:
            reading.applications.append(self.apply(file.arch, namings, m, facts.native))
        unused = len(file.keys) - len({k for a in reading.applications for k in a.used})
        if self.leftover_limit is not None and unused > self.leftover_limit:
            return Reading("ignored", f"{unused} keys match no module (more than {self.leftover_limit}): "
                                      f"'LoRA version mismatch', the whole file is skipped")
        return reading

    def apply(self, arch: Architecture, namings, m: FileModule, native=None) -> Application:
        found = pick(lookup(arch, namings, m.prefix, m.exact), m)
        if found is None:
            return Application(m, why=f"no {self.label} key for {m.prefix!r}")
        component, target = found
        used = [m.keys[r] for r in ("alpha", "dora") if r in m.keys]
        if m.kind == "lora":
            if m.suffix("up") + "|" + m.suffix("down") not in {f"{u}|{d}" for u, d in self.spellings}:
                return Application(m, why=f"{self.label} does not read the spelling {m.suffix('down')!r}")
            if "mid" in m.keys and m.suffix("up") != MID_WITH:
                return Application(m, why=f"{self.label} reads lora_mid only next to lora_up/lora_down")
            used += [m.keys[r] for r in ("up", "down", "mid") if r in m.keys]
            scale = m.alpha / m.shapes["down"][0] if m.alpha is not None else 1.0
        else:
            used += [k for r, k in m.keys.items() if r.startswith(("hada_", "lokr_")) or r == "diff"]
            scale = lycoris_scale(m)
        bias = False
        if "diff_b" in m.keys:
            used.append(m.keys["diff_b"])
            # on a row slice of a fused weight the bias target name is malformed: "NOT LOADED"
            bias = not sliced(arch, component, target, native if component == arch.denoiser else None)
        return Application(m, component, target, scale, bias, tuple(used))


def lycoris_scale(m: FileModule) -> float:
    """ComfyUI/Forge/A1111: alpha over the rows of LoHa's w1_b, of LoKr's w2_b (else w1_b); 1
    without alpha, for a full diff, and for a LoKr with no low-rank factor."""
    if m.alpha is None or m.kind == "full":
        return 1.0
    for role in (("hada_w1_b",) if m.kind == "loha" else ("lokr_w2_b", "lokr_w1_b")):
        if role in m.shapes:
            return m.alpha / m.shapes[role][0]
    return 1.0


def sliced(arch: Architecture, component: str, target, native=None) -> bool:
    """Whether the client patches a row slice of one of its own (fused) weights."""
    native = native or native_scheme(arch, component)
    if native is None or target.fused:
        return False
    encoded = native.encode(target.members[0])
    return encoded is not None and encoded[0].fused


CLIENT = ComfyUI("comfyui", "ComfyUI", "Comfy-Org/ComfyUI a125cd8 (2025-10-12)")
