"""Readers: every module type into its exact ΔW (checked against the formulas written out
here), every naming scheme onto the right module, bad input refused with a clear message."""

import json
import math

import pytest
import torch
from safetensors.torch import save_file

import loramerge
from loramerge.errors import NotALoraError, FileFormatError

G = torch.Generator().manual_seed(0)


def rnd(*shape):
    return torch.randn(*shape, generator=G)


# What kohya writes into every file; SD1 and SD2 modules outside cross-attention have the same
# names and shapes, so without it these one-module files would fit both (see test_detection.py).
SD1_HEADER = {"ss_base_model_version": "sd_v1"}


def read_one(tmp_path, tensors, name="x.safetensors", metadata=SD1_HEADER, **kw):
    path = tmp_path / name
    save_file(tensors, str(path), metadata=metadata)
    return loramerge.load(path, **kw)


def assert_delta(module, expected, tol=1e-5):
    got = module.delta(torch.float64)
    assert got.shape == expected.shape
    assert float((got - expected.double()).norm() / expected.double().norm()) < tol


Q = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
CONV = "lora_unet_down_blocks_0_resnets_0_conv1"  # SD1: Conv2d(320, 320, 3)


def test_kohya_lora_alpha_and_missing_alpha(tmp_path):
    up, down = rnd(320, 8), rnd(8, 320)
    lora = read_one(tmp_path, {f"{Q}.lora_up.weight": up, f"{Q}.lora_down.weight": down, f"{Q}.alpha": torch.tensor(4.0)})
    assert_delta(lora["unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"], 0.5 * up @ down)
    lora = read_one(tmp_path, {f"{Q}.lora_up.weight": up, f"{Q}.lora_down.weight": down}, "y.safetensors")
    assert_delta(next(iter(lora)), up @ down)  # no alpha: scale 1


def test_locon_tucker_mid(tmp_path):
    up, mid, down = rnd(320, 4, 1, 1), rnd(4, 4, 3, 3), rnd(4, 320, 1, 1)
    lora = read_one(tmp_path, {f"{CONV}.lora_up.weight": up, f"{CONV}.lora_mid.weight": mid,
                               f"{CONV}.lora_down.weight": down, f"{CONV}.alpha": torch.tensor(2.0)})
    # ΔW[o,i,h,w] = alpha/r · Σ_ab up[o,a] mid[a,b,h,w] down[b,i]
    expected = 0.5 * torch.einsum("oa,abhw,bi->oihw", up.flatten(1), mid, down.flatten(1))
    m = next(iter(lora))
    assert m.kind == "lora+tucker" and m.shape == (320, 320, 3, 3)
    assert_delta(m, expected)


def test_loha_linear_and_conv(tmp_path):
    w1a, w1b, w2a, w2b = rnd(320, 4), rnd(4, 320), rnd(320, 4), rnd(4, 320)
    lora = read_one(tmp_path, {f"{Q}.hada_w1_a": w1a, f"{Q}.hada_w1_b": w1b, f"{Q}.hada_w2_a": w2a,
                               f"{Q}.hada_w2_b": w2b, f"{Q}.alpha": torch.tensor(2.0)})
    m = next(iter(lora))
    assert m.kind == "loha" and m.rank == 16
    assert_delta(m, (w1a @ w1b) * (w2a @ w2b) * (2.0 / 4))
    # conv, flattened factors: the kernel shape comes from the SD1 key map
    c1a, c1b, c2a, c2b = rnd(320, 2), rnd(2, 320 * 9), rnd(320, 2), rnd(2, 320 * 9)
    lora = read_one(tmp_path, {f"{CONV}.hada_w1_a": c1a, f"{CONV}.hada_w1_b": c1b, f"{CONV}.hada_w2_a": c2a,
                               f"{CONV}.hada_w2_b": c2b}, "c.safetensors")
    m = next(iter(lora))
    assert m.shape == (320, 320, 3, 3)
    assert_delta(m, ((c1a @ c1b) * (c2a @ c2b)).reshape(320, 320, 3, 3))


def test_loha_tucker(tmp_path):
    t1, t2 = rnd(3, 3, 3, 3), rnd(3, 3, 3, 3)
    w1a, w1b, w2a, w2b = rnd(3, 320), rnd(3, 320), rnd(3, 320), rnd(3, 320)
    lora = read_one(tmp_path, {f"{CONV}.hada_t1": t1, f"{CONV}.hada_t2": t2, f"{CONV}.hada_w1_a": w1a,
                               f"{CONV}.hada_w1_b": w1b, f"{CONV}.hada_w2_a": w2a, f"{CONV}.hada_w2_b": w2b,
                               f"{CONV}.alpha": torch.tensor(1.5)})
    cp = lambda t, wa, wb: torch.einsum("ijkl,jr,ip->prkl", t, wb, wa)  # noqa: E731  (LyCORIS CP form)
    expected = cp(t1, w1a, w1b) * cp(t2, w2a, w2b) * (1.5 / 3)
    assert_delta(next(iter(lora)), expected)


def test_lokr_variants(tmp_path):
    # full w1 (4×4), decomposed w2 (80×r, r×80): ΔW = kron(w1, w2a@w2b) · alpha/r
    w1, w2a, w2b = rnd(4, 4), rnd(80, 2), rnd(2, 80)
    lora = read_one(tmp_path, {f"{Q}.lokr_w1": w1, f"{Q}.lokr_w2_a": w2a, f"{Q}.lokr_w2_b": w2b,
                               f"{Q}.alpha": torch.tensor(1.0)})
    m = next(iter(lora))
    assert m.kind == "lokr" and m.shape == (320, 320) and m.rank == 8
    assert_delta(m, torch.kron(w1, w2a @ w2b) * 0.5)
    # both full: scale 1 whatever alpha says
    v1, v2 = rnd(4, 4), rnd(80, 80)
    lora = read_one(tmp_path, {f"{Q}.lokr_w1": v1, f"{Q}.lokr_w2": v2, f"{Q}.alpha": torch.tensor(7.0)}, "b.safetensors")
    assert_delta(next(iter(lora)), torch.kron(v1, v2))
    # conv with a Tucker core on w2
    t2, a2, b2, c1 = rnd(2, 2, 3, 3), rnd(2, 80), rnd(2, 80), rnd(4, 4)
    lora = read_one(tmp_path, {f"{CONV}.lokr_w1": c1, f"{CONV}.lokr_t2": t2, f"{CONV}.lokr_w2_a": a2,
                               f"{CONV}.lokr_w2_b": b2, f"{CONV}.alpha": torch.tensor(1.0)}, "c.safetensors")
    w2 = torch.einsum("ijkl,jr,ip->prkl", t2, b2, a2).contiguous()
    expected = torch.kron(c1[:, :, None, None], w2) * 0.5
    m = next(iter(lora))
    assert m.shape == (320, 320, 3, 3)
    assert_delta(m, expected)


def test_full_diff_and_bias(tmp_path):
    diff, diff_b = rnd(320, 320), rnd(320)
    lora = read_one(tmp_path, {f"{Q}.diff": diff, f"{Q}.diff_b": diff_b})
    m = next(iter(lora))
    assert m.kind == "full"
    assert_delta(m, diff)
    assert torch.equal(m.bias_delta(), diff_b)


def test_unmappable_keys_are_listed(tmp_path):
    with pytest.raises(NotALoraError, match="lora_unet_weird_thing") as info:
        read_one(tmp_path, {f"{Q}.lora_up.weight": rnd(320, 4), f"{Q}.lora_down.weight": rnd(4, 320),
                            "lora_unet_weird_thing.lora_up.weight": rnd(8, 4),
                            "lora_unet_weird_thing.lora_down.weight": rnd(4, 8)})
    assert "cannot place" in str(info.value)
    with pytest.raises(NotALoraError, match="not a LoRA"):
        read_one(tmp_path, {"model.diffusion_model.conv_in.weight": rnd(4, 4)}, "model.safetensors")


def test_old_diffusers_attention_processor_names(tmp_path):
    p = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor"
    up, down = rnd(320, 4), rnd(4, 320)
    te = "text_encoder.text_model.encoder.layers.0.self_attn"
    lora = read_one(tmp_path, {f"{p}.to_out_lora.up.weight": up, f"{p}.to_out_lora.down.weight": down,
                               f"{te}.to_q_lora.up.weight": rnd(768, 4), f"{te}.to_q_lora.down.weight": rnd(4, 768),
                               "text_encoder.text_model.encoder.layers.0.mlp.fc1.lora_linear_layer.up.weight": rnd(3072, 4),
                               "text_encoder.text_model.encoder.layers.0.mlp.fc1.lora_linear_layer.down.weight": rnd(4, 768)})
    assert set(lora.modules) == {
        "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0",
        "text_encoder.text_model.encoder.layers.0.self_attn.q_proj",
        "text_encoder.text_model.encoder.layers.0.mlp.fc1",
    }
    assert lora.arch == "sd1"
    assert_delta(lora["unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0"], up @ down)


def test_diffusers_metadata_alphas_and_rslora(tmp_path):
    n1 = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    n2 = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_k"
    t = {f"unet.{n1}.lora_A.weight": rnd(4, 320), f"unet.{n1}.lora_B.weight": rnd(320, 4),
         f"unet.{n2}.lora_A.weight": rnd(2, 320), f"unet.{n2}.lora_B.weight": rnd(320, 2)}
    meta = {"unet.r": 4, "unet.lora_alpha": 8, "unet.rank_pattern": {n2: 2}, "unet.alpha_pattern": {n2: 1}}
    lora = read_one(tmp_path, t, metadata={"lora_adapter_metadata": json.dumps(meta)}, arch="sd1")
    assert lora[f"unet.{n1}"].scale == 2.0 and lora[f"unet.{n2}"].scale == 0.5
    meta["unet.use_rslora"] = True
    lora = read_one(tmp_path, t, "r.safetensors", metadata={"lora_adapter_metadata": json.dumps(meta)}, arch="sd1")
    assert lora[f"unet.{n1}"].scale == pytest.approx(8 / math.sqrt(4))
    assert lora[f"unet.{n2}"].scale == pytest.approx(1 / math.sqrt(2))


def test_peft_folder(tmp_path):
    folder = tmp_path / "adapter"
    folder.mkdir()
    n = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"
    up, down = rnd(320, 4), rnd(4, 768)
    save_file({f"base_model.model.{n}.lora_A.weight": down, f"base_model.model.{n}.lora_B.weight": up},
              str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text(json.dumps({"r": 4, "lora_alpha": 16, "peft_type": "LORA"}))
    lora = loramerge.load(folder)
    assert_delta(lora[f"unet.{n}"], 4.0 * up @ down)


FLUX1_HEADER = {"ss_base_model_version": "flux1"}  # block-only Flux.1 files fit Chroma (and Flux.2 klein) too


def test_flux_comfyui_and_ai_toolkit_names(tmp_path):
    qkv_up, down = rnd(3 * 3072, 4), rnd(4, 3072)
    lora = read_one(tmp_path, {"diffusion_model.double_blocks.0.img_attn.qkv.lora_A.weight": down,
                               "diffusion_model.double_blocks.0.img_attn.qkv.lora_B.weight": qkv_up},
                    metadata=FLUX1_HEADER)
    assert lora.arch == "flux" and len(lora) == 3
    for i, x in enumerate("qkv"):
        assert_delta(lora[f"transformer.transformer_blocks.0.attn.to_{x}"], qkv_up[i * 3072:(i + 1) * 3072] @ down)
    n = "transformer.single_transformer_blocks.3.attn.to_q"
    up, down = rnd(3072, 8), rnd(8, 3072)
    lora = read_one(tmp_path, {f"{n}.lora_A.weight": down, f"{n}.lora_B.weight": up, f"{n}.alpha": torch.tensor(4.0)},
                    "ait.safetensors", metadata=FLUX1_HEADER)
    assert lora.arch == "flux"
    assert_delta(lora[n], 0.5 * up @ down)


def test_flux_kohya_block_diagonal_qkv_is_split_at_each_members_rank(tmp_path):
    """A fused qkv whose up is block-diagonal (what the reverse of a split gives) reads back
    as three modules of the original ranks."""
    ups = [rnd(3072, 2) for _ in range(3)]
    downs = [rnd(2, 3072) for _ in range(3)]
    up = torch.block_diag(*ups)
    key = "lora_unet_double_blocks_1_txt_attn_qkv"
    lora = read_one(tmp_path, {f"{key}.lora_up.weight": up, f"{key}.lora_down.weight": torch.cat(downs),
                               f"{key}.alpha": torch.tensor(6.0)}, metadata=FLUX1_HEADER)
    for i, x in enumerate("qkv"):
        m = lora[f"transformer.transformer_blocks.1.attn.add_{x}_proj"]
        assert m.rank == 2
        assert_delta(m, ups[i] @ downs[i])


def test_sd3_diffusers_and_onetrainer_names(tmp_path):
    n = "transformer_blocks.0.attn.to_q"
    up, down = rnd(1536, 4), rnd(4, 1536)
    lora = read_one(tmp_path, {f"transformer.{n}.lora_A.weight": down, f"transformer.{n}.lora_B.weight": up})
    assert lora.arch == "sd3"
    lora = read_one(tmp_path, {f"lora_transformer_{n.replace('.', '_')}.lora_down.weight": down,
                               f"lora_transformer_{n.replace('.', '_')}.lora_up.weight": up}, "ot.safetensors")
    assert lora.arch == "sd3" and f"transformer.{n}" in lora


def test_sd2_is_told_from_sd1_by_shapes(tmp_path):
    key = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"
    lora = read_one(tmp_path, {f"{key}.lora_up.weight": rnd(320, 4), f"{key}.lora_down.weight": rnd(4, 1024)})
    assert lora.arch == "sd2"
    lora = read_one(tmp_path, {f"{key}.lora_up.weight": rnd(320, 4), f"{key}.lora_down.weight": rnd(4, 768)}, "b.safetensors")
    assert lora.arch == "sd1"
    assert read_one(tmp_path, {f"{key}.lora_up.weight": rnd(320, 4), f"{key}.lora_down.weight": rnd(4, 768)},
                    "c.safetensors", arch="sd2").arch == "sd2"


def test_pickles_only_through_weights_only(tmp_path):
    up, down = rnd(320, 4), rnd(4, 320)
    torch.save({f"{Q}.lora_up.weight": up, f"{Q}.lora_down.weight": down}, tmp_path / "ok.pt")
    assert_delta(next(iter(loramerge.load(tmp_path / "ok.pt", arch="sd1"))), up @ down)

    class Evil:
        def __reduce__(self):
            return (print, ("unpickled!",))

    torch.save({"x": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(FileFormatError, match="weights_only"):
        loramerge.load(tmp_path / "evil.pt")
