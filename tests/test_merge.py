"""Merging on ΔW: exact sums, the factored SVD against a dense SVD, and PEFT as a reference."""

import math

import pytest
import torch

import loramerge
from loramerge import linalg
from loramerge.lora import LoRA, LoraModule


def _lora(specs, seed, dtype=torch.float32):
    """specs: {(component, name): (shape, rank, alpha)} → an in-memory LoRA with random factors."""
    gen = torch.Generator().manual_seed(seed)
    mods = []
    for (component, name), (shape, rank, alpha) in specs.items():
        n = math.prod(shape[1:])
        up = torch.randn(shape[0], rank, generator=gen)
        down = torch.randn(rank, n, generator=gen) / n**0.5
        mods.append(LoraModule.from_factors(component, name, up.to(dtype), down.to(dtype), shape, alpha, dtype=dtype))
    return LoRA(mods, "sd1")


def dense(module: LoraModule) -> torch.Tensor:
    """ΔW in float64, straight from the definition (alpha/r)·up@down."""
    up, down = module.factors(torch.float64)
    return (module.alpha / module.rank) * (up @ down)


SPECS_A = {
    ("unet", "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"): ((64, 48), 8, 4.0),
    ("unet", "down_blocks.0.attentions.0.proj_in"): ((64, 64, 1, 1), 4, 4.0),
    ("unet", "down_blocks.0.resnets.0.conv1"): ((32, 16, 3, 3), 6, 3.0),
    ("text_encoder", "text_model.encoder.layers.0.self_attn.q_proj"): ((40, 40), 4, 1.0),
}
SPECS_B = {
    ("unet", "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"): ((64, 48), 3, 6.0),
    ("unet", "down_blocks.0.attentions.0.proj_in"): ((64, 64, 1, 1), 5, 5.0),
    ("unet", "down_blocks.0.resnets.0.conv1"): ((32, 16, 3, 3), 2, 1.0),
    ("unet", "up_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k"): ((64, 32), 4, 8.0),
}
WEIGHTS = (0.7, -0.4)


def _expected_sum(a, b, key):
    total = 0
    for lora, w in zip((a, b), WEIGHTS):
        if key in lora:
            total = total + w * dense(lora[key])
    return total


@pytest.mark.parametrize("method", ["linear", "cat"])
def test_exact_sum_any_ranks(method):
    a, b = _lora(SPECS_A, 1), _lora(SPECS_B, 2)
    merged = loramerge.merge([a, b], weights=WEIGHTS, method=method, device="cpu")
    assert set(merged.modules) == set(a.modules) | set(b.modules)  # modules of only one input kept
    for key, module in merged.modules.items():
        expected = _expected_sum(a, b, key)
        got = dense(module)
        assert float((got - expected).norm() / expected.norm()) < 1e-6, key
        assert module.shape == (a[key] if key in a else b[key]).shape
    shared = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    assert merged[shared].rank == (11 if method == "cat" else 11)  # 8 + 3, full numerical rank


def test_linear_drops_only_numerically_zero_directions():
    a = _lora(SPECS_A, 1)
    merged = loramerge.merge([a, a], weights=[0.5, 0.25], method="linear", device="cpu")
    key = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    assert merged[key].rank == a[key].rank  # a LoRA plus itself has its own rank, not twice it
    assert float((dense(merged[key]) - 0.75 * dense(a[key])).norm() / dense(a[key]).norm()) < 1e-6


def test_factored_svd_equals_dense_truncated_svd():
    a, b = _lora(SPECS_A, 3), _lora(SPECS_B, 4)
    rank = 5
    merged = loramerge.merge([a, b], weights=WEIGHTS, method="svd", rank=rank, device="cpu")
    for key, module in merged.modules.items():
        total = _expected_sum(a, b, key).reshape(module.shape[0], -1)
        U, S, Vh = torch.linalg.svd(total, full_matrices=False)
        k = min(rank, int((S > S[0] * 1e-12).sum()))
        best = (U[:, :k] * S[:k]) @ Vh[:k]
        got = dense(module).reshape(best.shape)
        assert module.rank == k
        assert float((got - best).norm() / best.norm()) < 1e-5, key
        assert float((got - best).abs().max() / best.abs().max()) < 1e-4, key


def test_energy_picks_the_smallest_rank_keeping_that_energy():
    a, b = _lora(SPECS_A, 5), _lora(SPECS_B, 6)
    merged = loramerge.merge([a, b], weights=WEIGHTS, method="svd", energy=0.9, device="cpu")
    for key, module in merged.modules.items():
        S = torch.linalg.svdvals(_expected_sum(a, b, key).reshape(module.shape[0], -1))
        kept = torch.cumsum(S**2, 0) / (S**2).sum()
        k = int((kept < 0.9 - 1e-12).sum()) + 1
        assert module.rank == k, key
        assert merged.stats[key]["energy_kept"] >= 0.9 - 1e-6


def test_lowrank_svd_kernel_never_needs_the_dense_matrix():
    gen = torch.Generator().manual_seed(0)
    B, A = torch.randn(300, 12, generator=gen), torch.randn(12, 200, generator=gen)
    svd = linalg.svd_of_product(B, A)
    assert svd.U.shape == (300, 12) and svd.Vh.shape == (12, 200)
    ref = torch.linalg.svdvals((B @ A).double())[:12]
    assert torch.allclose(svd.S.double(), ref, rtol=1e-5)
    assert linalg.frobenius_norm_of_product(B, A) == pytest.approx(float((B @ A).norm()), rel=1e-5)


# --------------------------------------------------------------------------------------------
# PEFT's add_weighted_adapter as a reference


class TwoLayers(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.q = torch.nn.Linear(48, 64)
        self.k = torch.nn.Linear(32, 64)


def _peft_model(adapters, use_rslora=False):
    """A PEFT model holding each adapter's exact factors: {name: {module: (up, down, alpha)}}."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    model, first = None, True
    for name, mods in adapters.items():
        rank = next(iter(mods.values()))[1].shape[0]
        alpha = next(iter(mods.values()))[2]
        config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(mods), use_rslora=use_rslora, init_lora_weights=False)
        if first:
            model = get_peft_model(TwoLayers(), config, adapter_name=name)
            first = False
        else:
            model.add_adapter(name, config)
        for module_name, (up, down, _) in mods.items():
            layer = dict(model.named_modules())[f"base_model.model.{module_name}"]
            layer.lora_A[name].weight.data.copy_(down)
            layer.lora_B[name].weight.data.copy_(up)
    return model


def _adapters(seed):
    gen = torch.Generator().manual_seed(seed)
    make = lambda m, n, r: (torch.randn(m, r, generator=gen), torch.randn(r, n, generator=gen) / n**0.5)  # noqa: E731
    a = {"q": (*make(64, 48, 6), 3.0), "k": (*make(64, 32, 6), 3.0)}
    b = {"q": (*make(64, 48, 6), 12.0), "k": (*make(64, 32, 6), 12.0)}
    return {"a": a, "b": b}


def _ours(adapters, weights, use_rslora=False, **merge_args):
    loras = []
    for mods in adapters.values():
        modules = []
        for name, (up, down, alpha) in mods.items():
            r = down.shape[0]
            alpha = alpha * math.sqrt(r) if use_rslora else alpha  # rsLoRA scale alpha/√r
            modules.append(LoraModule.from_factors("unet", name, up, down, (up.shape[0], down.shape[1]), alpha))
        loras.append(LoRA(modules, "sd1"))
    return loramerge.merge(loras, weights=weights, device="cpu", **merge_args)


def test_svd_matches_peft_add_weighted_adapter():
    """Convention: PEFT's svd takes each adapter's delta with its own scaling (alpha/r), sums
    them with the weights, truncates, and stores the new adapter with alpha = r (scale 1) — the
    same ΔW loramerge computes, from the factors instead of a dense SVD."""
    adapters, weights, rank = _adapters(0), [0.7, -0.4], 4
    model = _peft_model(adapters)
    model.add_weighted_adapter(["a", "b"], weights, "m", combination_type="svd", svd_rank=rank)
    ours = _ours(adapters, weights, method="svd", rank=rank)
    for name in ("q", "k"):
        layer = dict(model.named_modules())[f"base_model.model.{name}"]
        theirs = layer.get_delta_weight("m").double()
        mine = dense(ours[f"unet.{name}"])
        assert float((theirs - mine).norm() / theirs.norm()) < 1e-4, name


def test_peft_svd_merge_inherits_rslora_scaling():
    """PEFT difference, documented: the merged adapter copies the first adapter's config, so
    with use_rslora its scale becomes r/√r = √r instead of 1 and the merged ΔW is √r too large.
    loramerge folds rsLoRA's alpha/√r into alpha on reading and writes alpha = r."""
    adapters, weights, rank = _adapters(1), [0.7, -0.4], 4
    model = _peft_model(adapters, use_rslora=True)
    model.add_weighted_adapter(["a", "b"], weights, "m", combination_type="svd", svd_rank=rank)
    ours = _ours(adapters, weights, use_rslora=True, method="svd", rank=rank)
    layer = dict(model.named_modules())["base_model.model.q"]
    theirs = layer.get_delta_weight("m").double()
    mine = dense(ours["unet.q"])
    assert float((theirs / math.sqrt(rank) - mine).norm() / mine.norm()) < 1e-4


def test_peft_linear_has_cross_terms_loramerge_does_not():
    """PEFT's `linear` merges A's and B's separately: (Σ√(wᵢsᵢ)Bᵢ)(Σ√(wⱼsⱼ)Aⱼ) ≠ Σ wᵢΔWᵢ."""
    adapters, weights = _adapters(2), [0.5, 0.5]
    model = _peft_model(adapters)
    model.add_weighted_adapter(["a", "b"], weights, "m", combination_type="linear")
    layer = dict(model.named_modules())["base_model.model.q"]
    exact = sum(w * layer.get_delta_weight(n).double() for n, w in zip("ab", weights))
    peft_err = float((layer.get_delta_weight("m").double() - exact).norm() / exact.norm())
    ours = _ours(adapters, weights, method="linear")
    our_err = float((dense(ours["unet.q"]) - exact).norm() / exact.norm())
    assert peft_err > 0.1 and our_err < 1e-6


# --------------------------------------------------------------------------------------------
# weights and parameters: anything that is not a finite, sane number is refused in one line


def _refused(**kwargs):
    from loramerge.errors import UsageError

    a = _lora(SPECS_A, 7)
    with pytest.raises(UsageError) as err:
        loramerge.merge([a], device="cpu", **kwargs)
    assert "\n" not in str(err.value)
    return str(err.value)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf"), 1e300])
def test_non_finite_or_absurd_weights_are_refused(bad):
    assert "weight 1" in _refused(weights=[bad])


@pytest.mark.parametrize("method, name, bad", [
    ("ties", "density", float("nan")), ("ties", "lambda", float("nan")), ("ties", "lambda", float("inf")),
    ("ties", "lambda", 1e300), ("della", "epsilon", float("nan")), ("breadcrumbs", "gamma", float("nan")),
    ("iso_cts", "common_fraction", float("nan")), ("ties", "power_iters", 10**9), ("ties", "power_iters", 1e9),
    ("ties", "power_iters", float("inf")), ("ties", "oversample", 10**6), ("ties", "oversample", 2.5),
    ("ties", "oversample", float("nan")), ("ties", "power_iters", "1e9"),
])
def test_non_finite_and_unbounded_parameters_are_refused(method, name, bad):
    assert repr(name) in _refused(method=method, **{name: bad})


@pytest.mark.parametrize("bad", [float("nan"), 2.5, 0, -3])
def test_bad_ranks_are_refused(bad):
    assert "--rank" in _refused(method="svd", rank=bad)


def test_sane_integer_parameters_still_pass():
    a = _lora(SPECS_A, 8)
    merged = loramerge.merge([a], method="ties", space="full", power_iters=100, oversample=4.0, device="cpu")
    assert merged.modules
