"""Inference-time composition (loramerge.compose): each method against a re-statement of its rule
written here, denoising loops written by hand with the weight-patching live mix as the
independent reference, and exact restoration of the pipeline afterwards."""

from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import load_file

import loramerge
import tiny
from loramerge import tinyworld as tw
from loramerge.composer import StepInfo, schedule_value, strip_phrase
from loramerge.errors import UsageError
from loramerge.runtime import attach
from loramerge.tinyworld.lora import kohya_name

STEPS = 4
PROMPTS = ["a handwritten seven, bold, slanted", "a handwritten two, bold, slanted"]
PAIR = ("bold", "slanted")


@pytest.fixture(scope="module")
def pipe():
    return tw.load_pipeline()


@pytest.fixture(scope="module")
def latents():
    return torch.randn(len(PROMPTS), 4, 8, 8, generator=torch.Generator().manual_seed(5))


def paths(names=PAIR):
    return {n: tw.lora_paths()[n] for n in names}


def run(pipe, latents, guidance=2.5, prompts=PROMPTS):
    with torch.no_grad():
        return pipe(prompts, num_inference_steps=STEPS, guidance_scale=guidance, latents=latents.clone(),
                    output_type="latent").images


def denoiser_steps(trace):
    """{step: {layer key: {lora: coefficient}}} of the denoiser calls a composition recorded."""
    out: dict = {}
    for step, key, coefficients in trace:
        if step != "encode":
            out.setdefault(step, {}).setdefault(key, []).append(coefficients)
    return out


def hand_loop(pipe, latents, weights_at, guidance=2.5, text_weights=None, average_over=None):
    """SD sampling written out: the live mix (weight patching) sets the LoRAs of each pass.
    ``weights_at(step)`` gives the mix of a step; with ``average_over`` (a list of mixes), the
    guided predictions of those mixes are averaged instead."""
    from diffusers import DPMSolverMultistepScheduler

    mix = attach(pipe, paths())
    try:
        with torch.no_grad():
            mix.set_weights(text_weights or {n: 1.0 for n in PAIR})
            mix.fuse()
            positive, negative = pipe.encode_prompt(PROMPTS, "cpu", 1, True, negative_prompt=None)
            embeddings = torch.cat([negative, positive])
            scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
            scheduler.set_timesteps(STEPS)
            x = latents.clone() * scheduler.init_noise_sigma
            for step, t in enumerate(scheduler.timesteps):
                model_in = scheduler.scale_model_input(torch.cat([x] * 2), t)
                guided = []
                for weights in (average_over or [weights_at(step)]):
                    mix.set_weights(weights)
                    mix.fuse()
                    uncond, cond = pipe.unet(model_in, t, encoder_hidden_states=embeddings).sample.chunk(2)
                    guided.append(uncond + guidance * (cond - uncond))
                x = scheduler.step(sum(guided) / len(guided), t, x).prev_sample
    finally:
        mix.detach()
    return x


# ---------------------------------------------------------------------------------- the rules


def test_switch_activates_one_lora_per_tau_steps(pipe, latents):
    tau = 2
    with loramerge.compose(pipe, paths(), method="switch", tau=tau, record=True) as handle:
        got = run(pipe, latents)
    expected, current, held = [], 0, 0  # the rule, restated: tau steps each, round robin
    for _ in range(STEPS):
        expected.append(PAIR[current])
        held += 1
        if held == tau:
            current, held = (current + 1) % len(PAIR), 0
    steps = denoiser_steps(handle.trace)
    assert sorted(steps) == list(range(STEPS))
    for step, layers in steps.items():
        active = {name for calls in layers.values() for c in calls for name, v in c.items() if v}
        assert active == {expected[step]}, (step, active)
    reference = hand_loop(pipe, latents, lambda s: {n: float(n == expected[s]) for n in PAIR})
    torch.testing.assert_close(got, reference, rtol=1e-4, atol=1e-4)


def test_composite_averages_the_per_lora_guidance(pipe, latents):
    with loramerge.compose(pipe, paths(), method="composite"):
        got = run(pipe, latents, guidance=3.0)
    one_hot = [{n: float(n == m) for n in PAIR} for m in PAIR]
    reference = hand_loop(pipe, latents, None, guidance=3.0, average_over=one_hot)
    torch.testing.assert_close(got, reference, rtol=1e-4, atol=1e-4)
    single = hand_loop(pipe, latents, lambda s: one_hot[0], guidance=3.0)
    assert (got - single).abs().max() > 1e-2  # the average is not one LoRA alone


def test_schedule_gives_the_stated_weights(pipe, latents):
    weights = {"bold": {"progress": [[0.0, 1.0], [1.0, 0.0]]}, "slanted": {"steps": [0.0, 0.5, 1.0]}}
    blocks = {"slanted": {"progress": [[0.0, "ALL"], [0.5, {"unet.up_blocks.*": 0.0}]]}}
    with loramerge.compose(pipe, paths(), method="schedule", weights=weights, block_weights=blocks,
                           record=True) as handle:
        got = run(pipe, latents)
    bold_at = lambda s: 1.0 - s / STEPS  # noqa: E731  linear from 1 at step 0 towards 0
    slanted_at = lambda s: [0.0, 0.5, 1.0, 1.0][s]  # noqa: E731  per step, the last value held
    for step, layers in denoiser_steps(handle.trace).items():
        for key, calls in layers.items():
            for c in calls:
                assert c.get("bold", 0.0) == pytest.approx(bold_at(step) if key in _keys("bold") else 0.0)
                off = step >= STEPS / 2 and key.startswith("unet.up_blocks.")
                want = 0.0 if off or key not in _keys("slanted") else slanted_at(step)
                assert c.get("slanted", 0.0) == pytest.approx(want), (step, key)
    encode = [c for where, _, c in handle.trace if where == "encode"]
    assert encode and all(c.get("bold", 0) == 1.0 and c.get("slanted", 0) == 0.0 for c in encode)  # step 0 values
    assert schedule_value({"sigma": [[0.0, 0.0], [2.0, 1.0]]}, StepInfo(0, 4, sigma=1.0)) == pytest.approx(0.5)
    assert got.shape == latents.shape


def _keys(style):
    """Canonical keys of a shipped LoRA's modules, read from its kohya file (not via loramerge)."""
    names = {k.split(".")[0] for k in load_file(str(tw.lora_paths()[style]))}
    out = set()
    for component, prefix in (("unet", "lora_unet_"), ("text_encoder", "lora_te_")):
        for name, _ in getattr(_names_pipe(), component).named_modules():
            if name and kohya_name(prefix, name) in names:
                canonical = name if component == "unet" or name.startswith("text_model.") else "text_model." + name
                out.add(f"{component}.{canonical}")
    return out


_PIPE: list = []


def _names_pipe():
    if not _PIPE:
        _PIPE.append(tw.load_pipeline())
    return _PIPE[0]


def test_klora_selects_by_the_top_k_rule(pipe, latents):
    with loramerge.compose(pipe, paths(), method="klora", record=True) as handle:
        run(pipe, latents)
    # the rule restated from the files: ΔW = alpha/r · up @ down per kohya module
    tensors = {s: load_file(str(tw.lora_paths()[s])) for s in PAIR}

    def delta(style, name):
        t = tensors[style]
        up, down = t[f"{name}.lora_up.weight"].float(), t[f"{name}.lora_down.weight"].float()
        return float(t[f"{name}.alpha"]) / down.shape[0] * (up.flatten(1) @ down.flatten(1))

    both = sorted({k.split(".")[0] for k in tensors["bold"]} & {k.split(".")[0] for k in tensors["slanted"]})
    both = [n for n in both if n.startswith("lora_unet_")]
    ranks = {s: next(v.shape[0] for k, v in tensors[s].items() if k.endswith("lora_down.weight")) for s in PAIR}
    k = ranks["bold"] * ranks["slanted"]
    topk = {n: [float(delta(s, n).abs().flatten().sort(descending=True).values[:k].sum()) for s in PAIR] for n in both}
    ratios = [float(delta("bold", n).abs().sum() / delta("slanted", n).abs().sum()) for n in both]
    mean = sum(ratios) / len(ratios)
    gamma = sum(r for r in ratios if r < 3 * mean) / len([r for r in ratios if r < 3 * mean])
    by_kohya = {kohya_name("lora_unet_", key.removeprefix("unet.")): key for key in _keys("bold") | _keys("slanted")}
    layers = len(both)
    chosen_seen = set()
    for step, entries in _calls_in_order(handle.trace).items():
        j = 0
        for key, c in entries:
            name = next((n for n, canonical in by_kohya.items() if canonical == key), None)
            if name not in both:
                continue
            j += 1
            p = (step * layers + j) / (STEPS * layers)
            s = (1.5 * p + 1.5 * 0.85) % 1.5  # pattern s*: alpha 1.5, beta 0.85·alpha
            want = "bold" if (topk[name][0] / gamma) / (topk[name][1] * s) > 1 else "slanted"
            active = [n for n, v in c.items() if v]
            assert active == [want], (step, key, p)
            chosen_seen.add(want)
    assert chosen_seen == set(PAIR)  # the rule picks each LoRA somewhere


def _calls_in_order(trace):
    out: dict = {}
    for step, key, c in trace:
        if step != "encode":
            out.setdefault(step, []).append((key, c))
    return out


# ---------------------------------------------------------------------------------- own prompts


def test_own_prompts_give_each_lora_its_own_encoding(pipe, latents):
    seen = []  # what the cross-attention's key projection reads: the prompt's encoding, per pass
    to_k = pipe.unet.get_submodule("down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k")
    hook = to_k.register_forward_pre_hook(lambda m, args: seen.append(args[0].clone()))
    try:
        with loramerge.compose(pipe, paths(), method="composite", prompts="own") as handle:
            run(pipe, latents)
    finally:
        hook.remove()
    assert handle.unmatched_rows == 0
    mix = attach(pipe, paths())
    try:
        for i, style in enumerate(PAIR):
            mix.set_weights({n: float(n == style) for n in PAIR})
            mix.fuse()
            own = [strip_phrase(p, PAIR[1 - i]) for p in PROMPTS]
            assert all(style in p and PAIR[1 - i] not in p for p in own)
            with torch.no_grad():
                positive, negative = pipe.encode_prompt(own, "cpu", 1, True, negative_prompt=None)
            torch.testing.assert_close(seen[i], torch.cat([negative, positive]), rtol=1e-5, atol=1e-5)
    finally:
        mix.detach()
    assert len(seen) == STEPS * len(PAIR)


def test_own_prompts_hold_across_generations(pipe, latents):
    other = ["a handwritten four, bold, slanted", "a handwritten nine, bold, slanted"]
    with loramerge.compose(pipe, paths(), method="switch", prompts="own") as handle:
        run(pipe, latents)
        second = run(pipe, latents, prompts=other)
    with loramerge.compose(pipe, paths(), method="switch", prompts="own"):
        fresh = run(pipe, latents, prompts=other)
    assert torch.equal(second, fresh) and handle.unmatched_rows == 0


def test_strip_phrase():
    assert strip_phrase("a handwritten seven, bold, slanted", "bold") == "a handwritten seven, slanted"
    assert strip_phrase("bold, a seven", "bold") == "a seven"
    assert strip_phrase("a sbu cat in szn style", "szn style") == "a sbu cat in"
    assert strip_phrase("a boldly drawn seven", "bold") == "a boldly drawn seven"


# ---------------------------------------------------------------------------------- restoration


@pytest.mark.parametrize("method,params", [("mix", {}), ("switch", {"tau": 1}), ("composite", {"prompts": "own"}),
                                           ("klora", {"pattern": "s"}), ("schedule", {"weights": {"bold": 0.5}})])
def test_removal_restores_the_pipeline_exactly(pipe, latents, method, params):
    before = run(pipe, latents)
    handle = loramerge.compose(pipe, paths(), method=method, **params)
    during = run(pipe, latents)
    handle.remove()
    after = run(pipe, latents)
    assert torch.equal(before, after)
    assert not torch.equal(before, during)
    assert "forward" not in pipe.unet.__dict__ and "encode_prompt" not in pipe.__dict__
    assert not {"step", "set_timesteps"} & set(pipe.scheduler.__dict__)
    assert not any(m._forward_hooks for m in pipe.unet.modules())
    assert not any(m._forward_hooks for m in pipe.text_encoder.modules())


def test_errors_are_one_line(pipe):
    cases = [dict(method="blend"), dict(method="klora", loras=("bold", "slanted", "small")),
             dict(method="switch", weights={"bold": {"steps": [1, 0]}}), dict(method="mix", prompts="own"),
             dict(method="switch", tau=0), dict(method="mix", weights={"blod": 1.0})]
    for case in cases:
        names = case.pop("loras", PAIR)
        with pytest.raises(UsageError) as info:
            loramerge.compose(pipe, paths(names), **case)
        assert "\n" not in str(info.value)
    assert "forward" not in pipe.unet.__dict__  # a failed compose leaves nothing behind


# ---------------------------------------------------------------------------------- Flux


@pytest.fixture(scope="module")
def flux(tmp_path_factory):
    folder = tmp_path_factory.mktemp("flux")
    pipe = tiny.flux_pipeline()
    mods = tiny.targets(pipe, ("transformer",))
    a = tiny.random_factors(mods, rank=4, alpha=4.0, seed=1)
    b = tiny.random_factors({k: v for k, v in mods.items() if "attn" in k[1]}, rank=2, alpha=1.0, seed=2)
    tiny.write_diffusers(folder / "a.safetensors", a)
    # attention only: Chroma and HunyuanVideo have these modules too; the header says Flux.1
    tiny.write_diffusers(folder / "b.safetensors", b, header={"ss_base_model_version": "flux1"})
    return pipe, {"a": folder / "a.safetensors", "b": folder / "b.safetensors"}


def flux_inputs():
    g = torch.Generator().manual_seed(3)
    return dict(prompt_embeds=torch.randn(1, 6, 32, generator=g), pooled_prompt_embeds=torch.randn(1, 32, generator=g),
                num_inference_steps=3, height=16, width=16, output_type="latent", guidance_scale=1.0,
                generator=torch.Generator().manual_seed(0))


def flux_run(pipe):
    with torch.no_grad():
        return pipe(**flux_inputs()).images


def test_flux_switch_composite_and_restore(flux):
    pipe, files = flux
    before = flux_run(pipe)
    with loramerge.compose(pipe, files, method="switch", tau=1, record=True) as handle:
        switched = flux_run(pipe)
    for step, layers in denoiser_steps(handle.trace).items():
        active = {n for calls in layers.values() for c in calls for n, v in c.items() if v}
        assert active == {"ab"[step % 2]}, (step, active)
    # composite at the denoiser: the average of the transformer's outputs under each LoRA alone
    g = torch.Generator().manual_seed(9)
    inputs = dict(hidden_states=torch.randn(1, 64, 4, generator=g), encoder_hidden_states=torch.randn(1, 6, 32, generator=g),
                  pooled_projections=torch.randn(1, 32, generator=g), timestep=torch.tensor([0.5]),
                  img_ids=torch.zeros(64, 3), txt_ids=torch.zeros(6, 3), return_dict=False)
    with torch.no_grad(), loramerge.compose(pipe, files, method="composite"):
        composite = pipe.transformer(**inputs)[0]
    singles = []
    mix = attach(pipe, files)
    with torch.no_grad():
        for name in files:
            mix.set_weights({n: float(n == name) for n in files})
            mix.fuse()
            singles.append(pipe.transformer(**inputs)[0])
    mix.detach()
    torch.testing.assert_close(composite, (singles[0] + singles[1]) / 2, rtol=1e-5, atol=1e-5)
    with loramerge.compose(pipe, files, method="klora") as handle:
        klora = flux_run(pipe)
    assert math.isfinite(handle.klora_gamma) and handle.klora_gamma > 0
    assert not torch.equal(klora, before) and not torch.equal(switched, before)
    assert torch.equal(flux_run(pipe), before)
    assert "forward" not in pipe.transformer.__dict__
