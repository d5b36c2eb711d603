"""HiDream-I1 (Full, Dev, Fast share one transformer config): HiDreamImageTransformer2DModel.

diffusers' module names are the original checkpoint's (no fused projections, no swapped halves);
its feed-forwards are mixtures of experts (``ff_i.shared_experts``, ``ff_i.experts.{e}``, each a
SwiGLU of separate w1/w2/w3 Linears; the router gate is a bare Parameter, no LoRA target). No
LoRA format for its four text encoders exists, so the transformer is the only component.
"""

from ..blockgrammar import TransformerBlocks
from ..schemes.diffusers import DIFFUSERS
from . import Architecture, ClientFacts, Identity, Naming
from ._clients import A1111_NONE, FORGE_NONE
from ._common import dit_denoiser, peft

LLAMA_LAYERS = list(range(32)) + [31] * 16

TRANSFORMER = {"_class_name": "HiDreamImageTransformer2DModel", "patch_size": 2, "in_channels": 16,
               "out_channels": 16, "num_layers": 16, "num_single_layers": 32, "attention_head_dim": 128,
               "num_attention_heads": 20, "caption_channels": [4096, 4096], "text_emb_dim": 2048,
               "num_routed_experts": 4, "num_activated_experts": 2, "axes_dims_rope": [64, 32, 32],
               "max_resolution": [128, 128], "llama_layers": LLAMA_LAYERS, "force_inference_output": False}

ARCH = Architecture(
    name="hidream",
    label="HiDream-I1",
    denoiser="transformer",
    components=(dit_denoiser(DIFFUSERS),),  # lora_unet_/lycoris_ flattened, diffusion_model., transformer., bare
    variants={"hidream-i1": {"transformer": TRANSFORMER}},
    formats={
        "comfyui": {"transformer": peft("diffusion_model.", DIFFUSERS, "comfyui")},  # ai-toolkit
        "diffusers": {"transformer": peft("transformer.", DIFFUSERS)},
    },
    # both load exactly in diffusers (it re-prefixes diffusion_model. files) and in ComfyUI (raw names,
    # and transformer.+names in its HiDream branch); diffusers' own naming, with its metadata
    default_format="diffusers",
    identity=Identity("hidream_i1", "hidream-i1/lora", "https://github.com/HiDream-ai/HiDream-I1", "1024x1024",
                      ss_aliases=("hidream",), modelspec_aliases=("hidream",), base_models=("hidream",)),
    blocks=TransformerBlocks({"double": "double_stream_blocks", "single": "single_stream_blocks"}),
    pipelines=("HiDreamImagePipeline",),
    clients={
        # files whose keys all start with diffusion_model. are re-prefixed to transformer.
        # (tests/test_arch_flux.py, ai-toolkit's files, scale folded); lora_unet_/lycoris_ load nothing
        "diffusers": ClientFacts("dit", names={"transformer": (peft("diffusion_model.", DIFFUSERS, "comfyui"),)}),
        # native names are diffusers': its HiDream branch adds transformer. and lycoris_ (flattened)
        "comfyui": ClientFacts("comfyui", names={"transformer": (
            peft("transformer.", DIFFUSERS), Naming("lycoris_", DIFFUSERS, flat=True))}),
        "forge": FORGE_NONE,
        "a1111": A1111_NONE,
    },
)
