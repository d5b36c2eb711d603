"""Methods are functions of each LoRA's ΔW, not of how its file splits ΔW into up and down;
Iso-CTS adds no directions a merge of overlapping LoRAs does not have."""

import pytest
import torch

import loramerge
from loramerge.lora import LoRA, LoraModule

F64 = torch.float64
MODULES = {"down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q": (40, 24),
           "down_blocks.1.resnets.0.conv1": (16, 8, 3, 3)}
SPECS = [(4, 4.0), (3, 6.0), (5, 2.5)]
WEIGHTS = [0.8, -0.6, 1.1]


def factors(seed):
    """{name: (up, down, alpha)} per task, random, float64."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for rank, alpha in SPECS:
        task = {}
        for name, shape in MODULES.items():
            n = torch.Size(shape[1:]).numel()
            task[name] = (torch.randn(shape[0], rank, generator=gen, dtype=F64),
                          torch.randn(rank, n, generator=gen, dtype=F64), alpha)
        out.append(task)
    return out


def as_loras(tasks):
    return [LoRA([LoraModule.from_factors("unet", name, up, down, MODULES[name], alpha)
                  for name, (up, down, alpha) in task.items()], "sd1") for task in tasks]


def rescaled(up, down, alpha, gen):
    """(c·up, down/c), c between 0.25 and 4.25, different for every task and module."""
    c = 0.25 + 4 * float(torch.rand(1, generator=gen, dtype=F64))
    return c * up, down / c, alpha


def mixed(up, down, alpha, gen):
    """(up·G, G⁻¹·down) for a random invertible G."""
    r = up.shape[1]
    G = torch.randn(r, r, generator=gen, dtype=F64) + 2 * torch.eye(r, dtype=F64)
    return up @ G, torch.linalg.solve(G, down), alpha


def padded(up, down, alpha, gen):
    """Two extra zero components (rank r+2; alpha scaled so alpha/r is unchanged)."""
    r = up.shape[1]
    up2 = torch.cat([up, torch.zeros(up.shape[0], 2, dtype=F64)], 1)
    down2 = torch.cat([down, torch.randn(2, down.shape[1], generator=gen, dtype=F64)], 0)
    return up2, down2, alpha * (r + 2) / r


def refactored(tasks, how, seed):
    gen = torch.Generator().manual_seed(seed)
    return [{name: how(*f, gen) for name, f in task.items()} for task in tasks]


def dense(module):
    up, down = module.factors(F64)
    return module.scale * up @ down


CASES = [("ties", {}), ("ties", {"majority": "frequency", "density": 0.3}), ("dare_linear", {}), ("dare_ties", {}),
         ("magnitude_prune", {"density": 0.4}), ("breadcrumbs", {"density": 0.7, "gamma": 0.1}),
         ("della", {"density": 0.5, "epsilon": 0.2}), ("task_arithmetic", {}),
         ("ties", {"rank": 5}), ("knots", {}), ("knots", {"merge": "dare_ties"}), ("knots", {"topk_scope": "layer"}),
         ("knots", {"majority": "frequency", "density": 0.3})]


# float64 results agree to rounding; float32 results are float64 math rounded once, so they may
# differ by the last bit of a rare entry, far below one float32 ulp (1.2e-7) of the whole
TOLERANCE = {F64: 1e-9, torch.float32: 1e-7}


@pytest.mark.parametrize("compute", [F64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("how", [rescaled, mixed, padded])
@pytest.mark.parametrize("method, params", CASES)
def test_result_depends_on_delta_not_on_factorisation(method, params, how, compute):
    tasks = factors(0)
    assert all(torch.allclose(dense(a[k]), dense(b[k]))
               for a, b in zip(as_loras(tasks), as_loras(refactored(tasks, how, 1))) for k in a.modules)
    params = dict(params)
    if method != "knots":
        params["space"] = "core"
    kw = dict(weights=WEIGHTS, method=method, device="cpu", compute_dtype=compute, **params)
    a = loramerge.merge(as_loras(tasks), **kw)
    b = loramerge.merge(as_loras(refactored(tasks, how, 1)), **kw)
    for key in a.modules:
        ref = dense(a[key])
        assert float((dense(b[key]) - ref).norm() / ref.norm()) < TOLERANCE[compute], key


# --------------------------------------------------------------------------------------------
# Iso-CTS on overlapping LoRAs

SHAPE = (320, 640)


def one_lora(rank=16, seed=0, noise=0.0):
    gen = torch.Generator().manual_seed(seed)
    up = torch.randn(SHAPE[0], rank, generator=gen, dtype=F64)
    down = torch.randn(rank, SHAPE[1], generator=gen, dtype=F64) / 10
    if noise:  # a relative perturbation of both factors
        up = up * (1 + noise * torch.randn(up.shape, generator=gen, dtype=F64))
        down = down * (1 + noise * torch.randn(down.shape, generator=gen, dtype=F64))
    return LoRA([LoraModule.from_factors("unet", "mid_block.attentions.0.proj_in", up, down, SHAPE, 8.0,
                                         dtype=torch.float32)], "sd1")


KEY = "unet.mid_block.attentions.0.proj_in"


def test_iso_cts_of_a_lora_with_itself_stays_in_its_span_at_its_rank():
    a = one_lora()
    merged = loramerge.merge([a, a], weights=[0.5, 0.5], method="iso_cts", device="cpu")
    got = dense(merged[KEY])
    # the sum is the LoRA itself: all 16 directions are common, no task has a residual, and
    # Iso flattens the spectrum: mean(σ)·U·Vᵀ, computed here by a dense SVD
    U, S, Vh = torch.linalg.svd(dense(a[KEY]), full_matrices=False)
    expected = S[:16].mean() * U[:, :16] @ Vh[:16]
    assert merged[KEY].rank == 16
    outside = got - U[:, :16] @ (U[:, :16].T @ got)
    assert float(outside.norm() / got.norm()) < 1e-6
    assert float((got - expected).norm() / expected.norm()) < 1e-6


def test_iso_cts_is_stable_under_a_tiny_perturbation():
    exact = loramerge.merge([one_lora(), one_lora()], weights=[0.5, 0.5], method="iso_cts", device="cpu")
    nudged = loramerge.merge([one_lora(), one_lora(noise=1e-10)], weights=[0.5, 0.5], method="iso_cts", device="cpu")
    ref = dense(exact[KEY])
    assert nudged[KEY].rank == exact[KEY].rank
    assert float((dense(nudged[KEY]) - ref).norm() / ref.norm()) < 1e-6


def test_iso_cts_still_adds_genuine_task_directions():
    """Two different LoRAs: the residuals are real, each task keeps its share of the budget."""
    a, b = one_lora(8, seed=1), one_lora(8, seed=2)
    merged = loramerge.merge([a, b], weights=[0.5, 0.5], method="iso_cts", device="cpu", rank=10)
    # budget 10, common int(0.8·10) = 8 → 10 − round(2/2)·2 = 8 common, 1 per task
    assert merged[KEY].rank == 10
