"""Exact merges are exact at the output dtype's precision: what is written (factors cast to the
output dtype, read back, multiplied in float64) against the float64 sum Σ wᵢ(αᵢ/rᵢ)upᵢ@downᵢ
computed here from the stored factors.

Measure (2 ulps of the output dtype, relative to the whole delta):
    ‖ΔW_written − ΔW_ref‖_F ≤ 2·eps(dtype)·‖ΔW_ref‖_F     per module,
with eps = torch.finfo(dtype).eps (the spacing of floats at 1: 2⁻²³ fp32, 2⁻¹⁰ fp16, 2⁻⁷ bf16).
"""

import math

import pytest
import torch

import loramerge
from loramerge.lora import LoRA, LoraModule

F64 = torch.float64
# real SD1.5 module shapes: 1280-wide attention, a 3×3 conv, a text-encoder projection
MODULES = {
    ("unet", "mid_block.attentions.0.transformer_blocks.0.attn2.to_v"): (1280, 768),
    ("unet", "up_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"): (1280, 1280),
    ("unet", "down_blocks.0.resnets.0.conv1"): (320, 320, 3, 3),
    ("text_encoder", "text_model.encoder.layers.0.self_attn.q_proj"): (768, 768),
}
INPUTS = [(8, 4.0), (5, 5.0), (6, 1.0)]  # (rank, alpha): ranks and alphas differ per input
WEIGHTS = [0.7, -0.4, 1.3]


def spread_lora(rank, alpha, seed, label_dtype, magnitude=1.0):
    """Singular values of αᵢ/rᵢ·upᵢ@downᵢ log-spaced over 6 decades, the factors mixed by a random
    invertible matrix (so they are not the SVD) and stored as float32 numbers."""
    gen = torch.Generator().manual_seed(seed)
    mods = []
    for (component, name), shape in MODULES.items():
        m, n = shape[0], math.prod(shape[1:])
        U = torch.linalg.qr(torch.randn(m, rank, generator=gen, dtype=F64))[0]
        V = torch.linalg.qr(torch.randn(n, rank, generator=gen, dtype=F64))[0]
        sigma = magnitude * torch.logspace(0, -6, rank, dtype=F64) * (1 + torch.rand(rank, generator=gen, dtype=F64))
        G = torch.randn(rank, rank, generator=gen, dtype=F64) + 3 * torch.eye(rank, dtype=F64)
        up = (U * sigma.sqrt()) @ G
        down = torch.linalg.solve(G, sigma.sqrt()[:, None] * V.T) * (rank / alpha)
        mods.append(LoraModule.from_factors(component, name, up.float(), down.float(), shape, alpha,
                                            dtype=label_dtype))  # label: the output dtype
    return LoRA(mods, "sd1")


def reference(loras, weights, key):
    """Σ wᵢ(αᵢ/rᵢ)upᵢ@downᵢ in float64 from the stored factors (dense, written out here)."""
    total = 0
    for lora, w in zip(loras, weights):
        m = lora[key]
        up, down = (x.to(F64) for x in m.load())
        total = total + w * (m.alpha / m.rank) * (up.reshape(m.shape[0], -1) @ down.reshape(m.rank, -1))
    return total


def written(merged, tmp_path, dtype):
    """Save (factors cast to ``dtype``), read back, ΔW per module in float64."""
    path = tmp_path / f"merged-{str(dtype).split('.')[-1]}.safetensors"
    loramerge.save(merged, path, dtype=dtype)
    back = loramerge.load(path)
    out = {}
    for m in back:
        up, down = m.load()
        assert up.dtype == dtype and down.dtype == dtype
        assert torch.isfinite(up).all() and torch.isfinite(down).all(), m.key
        out[m.key] = (m.alpha / m.rank) * (up.to(F64).reshape(m.shape[0], -1) @ down.to(F64).reshape(m.rank, -1))
    return out


def assert_within_two_ulps(got, loras, weights, dtype):
    eps = torch.finfo(dtype).eps
    for key in (f"{c}.{n}" for c, n in MODULES):
        ref = reference(loras, weights, key)
        err = float((got[key] - ref).norm() / ref.norm())
        assert err <= 2 * eps, f"{key}: {err:.3g} > 2 ulps ({2 * eps:.3g})"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_linear_is_exact_at_the_output_precision(dtype, tmp_path):
    loras = [spread_lora(r, a, seed, dtype) for seed, (r, a) in enumerate(INPUTS)]
    merged = loramerge.merge(loras, weights=WEIGHTS, method="linear", device="cpu")
    assert_within_two_ulps(written(merged, tmp_path, dtype), loras, WEIGHTS, dtype)


@pytest.mark.parametrize("magnitude", [1e-12, 1e12])
def test_fp16_factors_of_tiny_and_huge_deltas_neither_underflow_nor_overflow(magnitude, tmp_path):
    """fp16 holds 6e-8…65504; factors of a ΔW with σ₁ = 1e±12 must still be written exactly:
    the magnitude goes into alpha (by a power of two), the factors stay near 1."""
    dtype = torch.float16
    loras = [spread_lora(r, a, seed, dtype, magnitude) for seed, (r, a) in enumerate(INPUTS)]
    merged = loramerge.merge(loras, weights=WEIGHTS, method="linear", device="cpu")
    assert_within_two_ulps(written(merged, tmp_path, dtype), loras, WEIGHTS, dtype)
    for m in merged:
        up, down = m.load()
        assert 2.0 ** -9 <= float(up.abs().max()) <= 2.0 ** 9 and 2.0 ** -9 <= float(down.abs().max()) <= 2.0 ** 9


def test_the_output_dtype_can_be_given_to_merge(tmp_path):
    """``dtype=`` tells the methods the precision to keep (the CLI's --dtype); fp32 inputs
    written as fp16 are exact to fp16, and the result is labelled fp16."""
    loras = [spread_lora(r, a, seed, torch.float32) for seed, (r, a) in enumerate(INPUTS)]
    merged = loramerge.merge(loras, weights=WEIGHTS, method="linear", device="cpu", dtype="fp16")
    assert merged.dtype == torch.float16
    assert_within_two_ulps(written(merged, tmp_path, torch.float16), loras, WEIGHTS, torch.float16)


@pytest.mark.parametrize("method, params", [("task_arithmetic", {}), ("magnitude_prune", {"density": 1.0}),
                                            ("dare_linear", {"density": 1.0})])
def test_core_space_linear_merges_are_exact_in_float32(method, params, tmp_path):
    """Core Space projects each task exactly (τᵢ = U_B·Mᵢ·V_A), so a linear rule there is the
    exact sum: float32 math, float32 output, 2 ulps, also for the small, spread-out tasks."""
    dtype = torch.float32
    loras = [spread_lora(r, a, seed, dtype) for seed, (r, a) in enumerate(INPUTS)]
    merged = loramerge.merge(loras, weights=WEIGHTS, method=method, device="cpu", space="core", **params)
    assert_within_two_ulps(written(merged, tmp_path, dtype), loras, WEIGHTS, dtype)
