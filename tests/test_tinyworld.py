"""The tiny digit world: shipped pipeline, style LoRAs (kohya files) and detectors.

Quality thresholds are the issue's acceptance criteria; the numbers are measured on the shipped
assets with fixed seeds. The training scripts run in --smoke mode.
"""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from loramerge import tinyworld as tw
from loramerge.tinyworld import data, detectors, evaluate, lora, paths, vocab

ROOT = Path(__file__).resolve().parents[1]
PER_DIGIT = 10  # 100 samples per measurement


@pytest.fixture(scope="module")
def pipe():
    return tw.load_pipeline()


@pytest.fixture(autouse=True)
def _no_leftover_lora(request):
    """Every test that touches the shared pipeline leaves it without LoRAs."""
    yield
    if "pipe" in request.fixturenames:
        request.getfixturevalue("pipe").unload_lora_weights()


# ---- assets -----------------------------------------------------------------------------------

def test_assets_are_small_and_never_pickled():
    files = [f for f in paths.ASSETS.rglob("*") if f.is_file()]
    assert sum(f.stat().st_size for f in files) < 20 * 1024 * 1024
    assert not [f for f in files if f.suffix in {".bin", ".pt", ".pth", ".pkl", ".ckpt"}]
    for style in tw.STYLES:
        assert tw.lora_paths()[style].is_file()


def test_pipeline_is_a_real_stable_diffusion_pipeline(pipe):
    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    assert isinstance(pipe, StableDiffusionPipeline)
    assert isinstance(pipe.unet, UNet2DConditionModel)
    assert isinstance(pipe.text_encoder, CLIPTextModel)
    assert isinstance(pipe.tokenizer, CLIPTokenizer)
    assert isinstance(pipe.vae, AutoencoderKL)
    assert pipe.safety_checker is None and pipe.feature_extractor is None
    names = {n for n, _ in pipe.unet.named_modules()}
    assert any(n.endswith("attn2.to_k") for n in names), "UNet needs cross-attention"
    index = json.loads((paths.pipeline_dir() / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline"
    for sub in ("unet", "vae", "text_encoder"):
        assert list((paths.pipeline_dir() / sub).glob("*.safetensors"))


def test_tokenizer_vocabulary_is_our_own():
    tok_dir = paths.pipeline_dir() / "tokenizer"
    shipped = json.loads((tok_dir / "vocab.json").read_text())
    from transformers import CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(str(tok_dir))
    for word in vocab.WORDS:
        ids = tokenizer(word).input_ids
        assert len(ids) == 3, f"{word!r} should be one token, got {tokenizer.convert_ids_to_tokens(ids)}"
    ids = tokenizer(data.prompt(7, ["bold", "slanted"])).input_ids
    assert tokenizer.convert_ids_to_tokens(ids)[1:-1] == [
        "a</w>", "handwritten</w>", "seven</w>", ",</w>", "bold</w>", ",</w>", "slanted</w>"]
    assert len(shipped) == len(tokenizer)


def test_tokenizer_files_are_regenerated_identically(tmp_path):
    vocab.write_tokenizer_files(tmp_path)
    tok_dir = paths.pipeline_dir() / "tokenizer"
    for name in ("vocab.json", "merges.txt"):
        assert (tmp_path / name).read_text() == (tok_dir / name).read_text()


# ---- generation -------------------------------------------------------------------------------

def test_generation_is_fast_and_reproducible(pipe):
    prompts, _ = tw.digit_prompts(2)
    start = time.time()
    first = tw.generate(pipe, prompts, seed=3)
    assert time.time() - start < 20
    assert first.shape == (20, 1, data.CANVAS, data.CANVAS)
    assert 0.0 <= float(first.min()) and float(first.max()) <= 1.0
    assert torch.equal(first, tw.generate(pipe, prompts, seed=3))
    assert not torch.equal(first, tw.generate(pipe, prompts, seed=4))


def test_base_pipeline_draws_the_prompted_digit(pipe):
    result = evaluate.digit_accuracy(pipe, PER_DIGIT, seed=0)
    assert result["accuracy"] >= 0.80, result["per_digit"]


# ---- detectors --------------------------------------------------------------------------------

def test_detectors_separate_held_out_real_digits():
    from loramerge.tinyworld import training

    measured = training.fit_detectors()
    shipped = tw.thresholds()
    for style in tw.STYLES:
        assert measured[style]["held_out_auc"] >= 0.95, (style, measured[style])
        assert measured[style]["threshold"] == pytest.approx(shipped[style], rel=1e-3)


def test_classifier_reads_held_out_digits_in_every_style():
    images, labels = data.load_split("held_out")
    assert (tw.classify(images) == labels.numpy()).mean() >= 0.95
    for style in tw.STYLES:
        styled = data.TRANSFORMS[style](images)
        assert (tw.classify(styled) == labels.numpy()).mean() >= 0.90, style


def test_style_scores_respond_to_their_own_transform_only():
    images, _ = data.load_split("held_out")
    limits = tw.thresholds()
    plain = tw.style_hits(images)
    for style in tw.STYLES:
        assert plain[style].mean() <= 0.05
        styled = tw.style_hits(data.TRANSFORMS[style](images))
        assert styled[style].mean() >= 0.95, style
    assert set(limits) == set(tw.STYLES)


def test_roc_auc_matches_definition():
    neg, pos = np.array([0.1, 0.4, 0.35, 0.8]), np.array([0.9, 0.35, 0.5])
    pairs = [(p > n) + 0.5 * (p == n) for p in pos for n in neg]
    assert detectors.roc_auc(neg, pos) == pytest.approx(np.mean(pairs))


# ---- style LoRAs ------------------------------------------------------------------------------

KOHYA_KEY = re.compile(r"^lora_(unet|te)_[a-z0-9_]+\.(lora_down\.weight|lora_up\.weight|alpha)$")


@pytest.mark.parametrize("style", tw.STYLES)
def test_lora_file_is_kohya_format(style):
    from safetensors import safe_open

    with safe_open(str(tw.lora_paths()[style]), "pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    spec = lora.SPECS[style]
    assert meta["ss_network_module"] == "networks.lora"
    assert meta["ss_base_model_version"] == "sd_v1"
    assert meta["modelspec.sai_model_spec"] == "1.0.1"
    assert meta["modelspec.architecture"] == "stable-diffusion-v1/lora"
    assert meta["modelspec.trigger_phrase"] == tw.trigger_words()[style]
    assert int(meta["ss_network_dim"]) == spec["rank"] and float(meta["ss_network_alpha"]) == spec["alpha"]
    assert all(KOHYA_KEY.match(k) for k in tensors), [k for k in tensors if not KOHYA_KEY.match(k)]
    modules = {k.split(".")[0] for k in tensors}
    for m in modules:
        down, up, alpha = (tensors[f"{m}.{p}"] for p in ("lora_down.weight", "lora_up.weight", "alpha"))
        assert down.shape[0] == spec["rank"] and up.shape[1] == spec["rank"]
        assert alpha.dim() == 0 and float(alpha) == spec["alpha"]
    assert any("_attn2_to_k" in m for m in modules) and any("_attn1_to_out_0" in m for m in modules)
    for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
        assert f"lora_te_text_model_encoder_layers_0_self_attn_{proj}" in modules


def test_lora_ranks_and_alphas_vary():
    specs = [(s["rank"], s["alpha"]) for s in lora.SPECS.values()]
    assert {r for r, _ in specs} >= {4, 8, 16}
    assert any(r != a for r, a in specs)


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


@pytest.mark.parametrize("style", tw.STYLES)
def test_diffusers_loads_kohya_file_and_fuses_exactly(pipe, style):
    """diffusers' own loader takes every key, and fusing gives W + alpha/r * up @ down."""
    from safetensors.torch import load_file

    path = tw.lora_paths()[style]
    kohya = load_file(str(path))
    base = {"lora_unet_": pipe.unet, "lora_te_": pipe.text_encoder}
    before = {lora.kohya_name(prefix, n): (prefix, n, m.weight.detach().clone())
              for prefix, model in base.items() for n, m in model.named_modules()
              if isinstance(getattr(m, "weight", None), torch.Tensor)}
    te_before = {k: v.clone() for k, v in pipe.text_encoder.state_dict().items()}
    records = _Records()
    loggers = [logging.getLogger(n) for n in ("diffusers", "peft", "transformers")]
    for lg in loggers:
        lg.addHandler(records)
    try:
        pipe.load_lora_weights(str(path), adapter_name=style)
    finally:
        for lg in loggers:
            lg.removeHandler(records)
    assert not [m for m in records.messages if "unexpected" in m.lower() or "missing" in m.lower()], records.messages

    # transformers 5 prints a load report calling the text encoder's base weights MISSING:
    # check that loading left every one of them as it was
    te_after = pipe.text_encoder.state_dict()
    for key, value in te_before.items():
        head, leaf = key.rsplit(".", 1)
        now = te_after.get(key, te_after.get(f"{head}.base_layer.{leaf}"))
        assert now is not None and torch.equal(now, value), key
    pipe.fuse_lora(lora_scale=1.0, adapter_names=[style])
    modules = {k.split(".")[0] for k in kohya}
    for name in modules:
        prefix, path_in_model, w0 = before[name]
        layer = base[prefix].get_submodule(path_in_model)
        fused = getattr(layer, "base_layer", layer).weight.detach()
        down, up = kohya[f"{name}.lora_down.weight"].float(), kohya[f"{name}.lora_up.weight"].float()
        scale = float(kohya[f"{name}.alpha"]) / down.shape[0]
        delta = (up.flatten(1) @ down.flatten(1)).view_as(w0) * scale
        assert delta.abs().max() > 0, name
        torch.testing.assert_close(fused, w0 + delta, rtol=1e-4, atol=1e-5)
    pipe.unfuse_lora()


@pytest.mark.parametrize("style", tw.STYLES)
def test_each_lora_shows_its_style_and_base_does_not(pipe, style):
    base = evaluate.style_hit_rate(pipe, style, PER_DIGIT, seed=0)
    pipe.load_lora_weights(str(tw.lora_paths()[style]), adapter_name=style)
    with_lora = evaluate.style_hit_rate(pipe, style, PER_DIGIT, seed=0)
    assert with_lora["hit_rate"] >= 0.90, with_lora["hit_rate"]
    assert base["hit_rate"] <= 0.10, base["hit_rate"]


# ---- training scripts (smoke) -----------------------------------------------------------------

def _run(script: str, *args: str) -> None:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT / "src"))
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / script), "--smoke", *args],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]


def test_training_scripts_smoke(tmp_path):
    from safetensors.torch import load_file

    _run("train_detectors.py", "--out", str(tmp_path))
    assert detectors.load_classifier(paths.classifier_path(tmp_path)) is not None
    _run("train_tinyworld.py", "--out", str(tmp_path))
    small = tw.load_pipeline(paths.pipeline_dir(tmp_path))
    assert tw.generate(small, ["a handwritten one"], steps=2).shape == (1, 1, 32, 32)
    _run("train_style_loras.py", "--out", str(tmp_path), "--styles", "bold")
    kohya = load_file(str(paths.lora_path("bold", tmp_path)))
    assert any(k.startswith("lora_te_") for k in kohya) and any(k.startswith("lora_unet_") for k in kohya)
    small.load_lora_weights(str(paths.lora_path("bold", tmp_path)))
    report = json.loads(paths.report_path(tmp_path).read_text())
    assert {"detectors", "pipeline", "loras"} <= set(report)


# ---- composition reference --------------------------------------------------------------------

def test_real_reference_row_is_the_detectors_ceiling():
    """Both transforms on real digits: bold and slanted compose; shrinking thins bold strokes."""
    from loramerge.tinyworld import composition

    both = composition.real_reference(("bold", "slanted"))
    assert both.accuracy >= 0.85 and min(both.retention.values()) >= 0.95, both
    clash = composition.real_reference(("bold", "small"))
    assert clash.hits["bold"] <= 0.05 and clash.hits["small"] >= 0.90, clash
    assert clash.composition == pytest.approx(clash.accuracy * clash.retention["bold"])
