"""``check`` on the newer architectures (Qwen-Image, Z-Image, Lumina 2, Wan, HunyuanVideo, LTX,
Flux.2, Chroma, HiDream): files loramerge writes, ranks 1-3 on a few modules of each full-size
model (names and shapes from the key tables). Where ``check`` says diffusers loads a file
exactly, diffusers' own ``lora_state_dict`` (its converters included) is the judge: the same
modules, and the same ΔW on probe vectors. A1111 has no loader for any of them, Forge only for
Chroma.
"""

import json
import math
import re
import warnings

import pytest
import torch

import diffusers
import loramerge
import tiny_video as tv
from loramerge import LoRA, LoraModule, clients

VARIANT = {"qwen_image": "qwen-image", "zimage": "z-image-turbo", "lumina2": "lumina2", "wan": "wan2.1-t2v-1.3b",
           "hunyuanvideo": "hunyuanvideo", "ltx-video": "ltx-video-0.9-2b", "ltx2": "ltx2",
           "flux2": "flux2-klein-4b", "chroma": "chroma", "hidream": "hidream-i1"}
PIPELINE = {"qwen_image": "QwenImagePipeline", "zimage": "ZImagePipeline", "lumina2": "Lumina2Pipeline",
            "wan": "WanPipeline", "hunyuanvideo": "HunyuanVideoPipeline", "ltx-video": "LTXPipeline",
            "ltx2": "LTX2Pipeline", "flux2": "Flux2Pipeline", "chroma": "ChromaPipeline",
            "hidream": "HiDreamImagePipeline"}
# the first block's modules (fused targets whole: q, k, v of a qkv, linear1's four parts)
PICK = {"qwen_image": r"^transformer_blocks\.0\.", "zimage": r"^layers\.0\.", "lumina2": r"^layers\.0\.",
        "wan": r"^blocks\.0\.", "hunyuanvideo": r"^transformer_blocks\.0\.", "ltx-video": r"^transformer_blocks\.0\.",
        "ltx2": r"^transformer_blocks\.0\.(attn1|attn2|ff)\.", "flux2": r"^(single_)?transformer_blocks\.0\.",
        "chroma": r"^(single_)?transformer_blocks\.0\.", "hidream": r"^double_stream_blocks\.0\.block\.attn1\."}
# the clients the notes and the architecture tests say load the default format exactly
EXACT = {"qwen_image": {"diffusers", "comfyui"}, "zimage": {"diffusers", "comfyui"}, "lumina2": {"comfyui"},
         "wan": {"comfyui"}, "hunyuanvideo": {"comfyui"}, "ltx-video": {"comfyui"}, "ltx2": {"comfyui"},
         "flux2": {"comfyui"}, "chroma": {"diffusers", "comfyui"}, "hidream": {"diffusers", "comfyui"}}
# diffusers loads these default files, but through conversions check does not model (unknown)
DIFFUSERS_UNMODELLED = {"lumina2", "wan", "hunyuanvideo", "ltx-video", "ltx2", "flux2"}
ARCHS = list(VARIANT)


def tiny_lora(arch: str, seed: int = 0, extra: dict[str, str] | None = None) -> LoRA:
    """On the picked full-size modules: ranks 1, 2, 3 and alphas 0.5, 1.5, 2.5, 3.5 cycling apart
    (so scale differs per module and is rarely 1), fp16 factors; ``extra``: {component: pattern}
    of further modules."""
    gen = torch.Generator().manual_seed(seed)
    picks = {"transformer": PICK[arch], **(extra or {})}
    modules = []
    for component, pattern in picks.items():
        table = tv.table(VARIANT[arch], component, pattern)
        assert table, (arch, component, pattern)
        for i, (name, shape) in enumerate(sorted(table.items())):
            cols = math.prod(shape[1:])
            rank = 1 + i % 3
            up = (torch.randn(shape[0], rank, generator=gen) * 0.1).half()
            down = (torch.randn(rank, cols, generator=gen) / cols ** 0.5).half()
            modules.append(LoraModule.from_factors(component, name, up, down, tuple(shape), alpha=0.5 + i % 4,
                                                   dtype=torch.float16))
    lora = LoRA(modules, arch)
    lora.variant = VARIANT[arch]
    return lora


def written(tmp_path, arch: str, format: str | None = None, **kw):
    path = tmp_path / f"{arch}-{format or 'default'}.safetensors"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the writers' client notes
        fmt = loramerge.save(tiny_lora(arch, **kw), path, format=format)
    return path, fmt


def probe(cols: int) -> torch.Tensor:
    return torch.randn(cols, 3, generator=torch.Generator().manual_seed(cols), dtype=torch.float64)


def assert_diffusers_agrees(arch: str, path) -> None:
    """diffusers' lora_state_dict (converters included) holds the file's modules under
    ``transformer.`` with the file's ΔW (scale: the adapter metadata's, else 1)."""
    sd, meta = getattr(diffusers, PIPELINE[arch]).lora_state_dict(str(path), return_lora_metadata=True)
    theirs = {k[len("transformer."):-len(".lora_A.weight")]: (sd[k.replace("lora_A", "lora_B")], sd[k])
              for k in sd if k.endswith(".lora_A.weight")}
    lora = loramerge.load(path, arch=arch)
    assert set(theirs) == {m.name for m in lora}
    meta = {k[len("transformer."):]: v for k, v in (meta or {}).items() if k.startswith("transformer.")}
    for m in lora:
        up, down = (t.double() for t in theirs[m.name])
        scale = 1.0
        if meta:  # PEFT's reading of the config diffusers passes it
            r = meta.get("rank_pattern", {}).get(f"^{m.name}", meta["r"])
            scale = next((v for k, v in meta.get("alpha_pattern", {}).items()
                          if re.match(rf"(.*\.)?({k})$", m.name)), meta["lora_alpha"]) / r
        x = probe(down.shape[1])
        ours_up, ours_down = (t.double() for t in m.factors())
        expected = m.scale * ours_up.reshape(ours_up.shape[0], -1) @ (ours_down.reshape(ours_down.shape[0], -1) @ x)
        got = scale * up @ (down @ x)
        # fp16 files: a converter that bakes alpha / rank into fp16 factors rounds (≤ 2 fp16 ulps)
        tol, atol = (1e-4, 1e-7) if m.dtype == torch.float32 else (2e-3, 2e-3 * float(expected.abs().max()))
        assert torch.allclose(got, expected, rtol=tol, atol=atol), m.name


@pytest.mark.parametrize("arch", ARCHS)
def test_default_format_verdicts(tmp_path, arch):
    path, fmt = written(tmp_path, arch)
    assert fmt == loramerge.formats.archs.spec(arch).default_format
    report = clients.check(path, arch=arch)
    exact = {v.client for v in report.verdicts if v.exact}
    assert exact == EXACT[arch], clients.format_report(report)
    assert report.verdict("a1111").outcome == "unsupported"
    if arch != "chroma":
        assert report.verdict("forge").outcome == "unsupported"
    if arch in DIFFUSERS_UNMODELLED:
        assert report.verdict("diffusers").outcome == "unknown"
    if "diffusers" in EXACT[arch]:
        assert_diffusers_agrees(arch, path)


@pytest.mark.parametrize("arch", ARCHS)
def test_diffusers_format_is_exact_in_diffusers(tmp_path, arch):
    """transformer. + diffusers names: PEFT as is, in every newer pipeline."""
    path, _ = written(tmp_path, arch, "diffusers")
    report = clients.check(path, arch=arch)
    assert report.verdict("diffusers").exact, clients.format_report(report)
    assert_diffusers_agrees(arch, path)
    # ComfyUI maps diffusers names for these model classes only (notes §1.2; Flux.2's not determined)
    comfy = report.verdict("comfyui")
    if arch in ("qwen_image", "zimage", "chroma", "hidream"):
        assert comfy.exact, clients.format_report(report)
    else:
        assert comfy.outcome == "loaded" and comfy.applied == 0


def test_chroma_in_forge_needs_bfl_names(tmp_path):
    """Forge runs Chroma but maps no diffusers names for it: a diffusers-named file is lost (and
    with more than 12 unused keys ignored whole); kohya BFL names load exactly."""
    path, _ = written(tmp_path, "chroma")
    forge = clients.check(path, "forge", arch="chroma").verdict("forge")
    assert forge.outcome == "ignored" and len(forge.lost) == forge.modules
    path, _ = written(tmp_path, "chroma", "kohya")
    report = clients.check(path, arch="chroma")
    assert report.verdict("forge").exact and report.verdict("comfyui").exact, clients.format_report(report)


def test_hunyuanvideo_comfyui_spellings(tmp_path):
    """ComfyUI's generic candidates come from its Flux-style model: musubi's kohya names coincide
    with them for the fused attention (img_attn_qkv) but not for the MLP (img_mlp_fc1) or the
    modulation (img_mod_linear); its HunyuanVideo branch takes the Tencent names dotted."""
    path, _ = written(tmp_path, "hunyuanvideo", "kohya")
    comfy = clients.check(path, "comfyui", arch="hunyuanvideo").verdict("comfyui")
    lost = set(comfy.lost)
    assert {"transformer.transformer_blocks.0.attn.to_q", "transformer.transformer_blocks.0.attn.add_k_proj",
            "transformer.transformer_blocks.0.attn.to_out.0"}.isdisjoint(lost)
    assert {"transformer.transformer_blocks.0.ff.net.0.proj", "transformer.transformer_blocks.0.norm1.linear"} <= lost


def test_ltx2_connector_blocks_load_in_comfyui(tmp_path):
    """LTX-2's connector blocks lie in ComfyUI's diffusion model; diffusers' handling of the
    connectors is not modelled."""
    path, fmt = written(tmp_path, "ltx2", extra={"connectors": r"^video_connector\.transformer_blocks\.0\.attn1\."})
    assert fmt == "comfyui"
    report = clients.check(path, arch="ltx2")
    assert report.verdict("comfyui").exact, clients.format_report(report)
    assert report.verdict("diffusers").outcome == "unknown"


def test_qwen_kohya_is_converted_exactly(tmp_path):
    """musubi-tuner's lora_unet_ + diffusers names with .alpha: diffusers' Qwen converter folds
    the alpha onto the same modules; ComfyUI maps them generically."""
    path, _ = written(tmp_path, "qwen_image", "kohya")
    report = clients.check(path, arch="qwen_image")
    assert report.verdict("diffusers").exact and report.verdict("comfyui").exact, clients.format_report(report)
    assert_diffusers_agrees("qwen_image", path)


def test_unmodelled_diffusers_conversions_are_unknown(tmp_path):
    """Converted spellings are exact only as verified: lora_A with .alpha keys under
    diffusion_model. (OneTrainer COMFY) and Z-Image's original fused names are not modelled."""
    from safetensors.torch import load_file, save_file

    path, _ = written(tmp_path, "qwen_image")
    sd = load_file(str(path))
    for key in [k for k in sd if k.endswith(".lora_A.weight")]:
        sd[key.replace(".lora_A.weight", ".alpha")] = torch.tensor(float(sd[key].shape[0]))
    save_file(sd, str(tmp_path / "alpha.safetensors"))
    verdict = clients.check(tmp_path / "alpha.safetensors", "diffusers", arch="qwen_image").verdict("diffusers")
    assert verdict.outcome == "unknown"
    path, _ = written(tmp_path, "zimage", "kohya")
    assert clients.check(path, "diffusers", arch="zimage").verdict("diffusers").outcome == "unknown"


def test_wan_low_noise_expert_is_not_modelled_in_diffusers(tmp_path):
    from safetensors.torch import load_file, save_file

    path, _ = written(tmp_path, "wan", "diffusers")
    sd = {}
    for key, value in load_file(str(path)).items():
        sd[key] = value
        sd["transformer_2." + key[len("transformer."):]] = value.clone()
    save_file(sd, str(tmp_path / "both.safetensors"),
              metadata={"modelspec.architecture": "wan2.1/lora"})
    report = clients.check(tmp_path / "both.safetensors", arch="wan")
    assert report.verdict("diffusers").outcome == "unknown"
    assert json.dumps(report.as_dict())  # serialisable
