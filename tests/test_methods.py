"""Every merge method against a dense reference of its paper's formula written here (small
matrices, float64), plus Core Space properties and PEFT's *_svd types as a client."""

import math

import pytest
import torch

import loramerge
from loramerge.lora import LoRA, LoraModule
from loramerge.merge import _module_seed

F64 = torch.float64
KEY = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
KEY2 = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_k"


def make(specs, seed):
    """specs: list of (rank, alpha) per task, each on KEY (14×11) and KEY2 (9×13)."""
    gen = torch.Generator().manual_seed(seed)
    loras = []
    for rank, alpha in specs:
        mods = []
        for key, (m, n) in ((KEY, (14, 11)), (KEY2, (9, 13))):
            up = torch.randn(m, rank, generator=gen, dtype=F64)
            down = torch.randn(rank, n, generator=gen, dtype=F64)
            mods.append(LoraModule.from_factors("unet", key.split(".", 1)[1], up, down, (m, n), alpha))
        loras.append(LoRA(mods, "sd1"))
    return loras


TASKS = [(3, 6.0), (2, 1.0), (4, 4.0)]
WEIGHTS = [0.7, -0.5, 1.2]


def taus(loras, weights, key=KEY):
    return torch.stack([w * l[key].delta(F64) for l, w in zip(loras, weights)])


def run(loras, weights, method, **kw):
    kw.setdefault("compute_dtype", F64)
    return loramerge.merge(loras, weights=weights, method=method, device="cpu", **kw)


def rel(a, b):
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def ref_trim(t, d):
    out = torch.zeros_like(t)
    k = int(d * t.numel())
    idx = t.abs().reshape(-1).argsort(descending=True)[:k]
    out.reshape(-1)[idx] = t.reshape(-1)[idx]
    return out


def ref_ties(stack, d=None, lam=1.0):
    trimmed = torch.stack([ref_trim(t, d) if d is not None else t for t in stack])
    gamma = torch.where(trimmed.sum(0) >= 0, 1.0, -1.0).to(F64)
    agree = (torch.sign(trimmed) == gamma)
    return lam * (trimmed * agree).sum(0) / agree.sum(0).clamp_min(1)


def crumbs(x, d, g):
    """Breadcrumbs: drop the int(g·n) largest (fewer if d + g > 1), keep the next int(d·n)."""
    n = x.numel()
    n_keep = int(d * n)
    n_top = min(int(g * n), n - n_keep)
    keep = x.abs().reshape(-1).argsort(descending=True)[n_top:n_top + n_keep]
    out = torch.zeros_like(x)
    out.reshape(-1)[keep] = x.reshape(-1)[keep]
    return out


FULL = dict(space="full", oversample=64)  # sketch as wide as the matrix: the re-factorisation is exact


def test_ties_full_space():
    loras = make(TASKS, 0)
    got = run(loras, WEIGHTS, "ties", rank=11, density=0.4, **FULL, **{"lambda": 0.8})
    assert rel(got[KEY].delta(F64), ref_ties(taus(loras, WEIGHTS), 0.4, 0.8)) < 1e-10
    assert got.stats[KEY]["refactor_error"] < 1e-10


def test_magnitude_prune_and_breadcrumbs_full_space():
    loras = make(TASKS, 1)
    t = taus(loras, WEIGHTS)
    got = run(loras, WEIGHTS, "magnitude_prune", rank=11, density=0.3, **FULL)
    assert rel(got[KEY].delta(F64), torch.stack([ref_trim(x, 0.3) for x in t]).sum(0)) < 1e-10

    got = run(loras, WEIGHTS, "breadcrumbs", rank=11, density=0.6, gamma=0.05, **FULL)
    assert rel(got[KEY].delta(F64), torch.stack([crumbs(x, 0.6, 0.05) for x in t]).sum(0)) < 1e-10


def _rand(shape, key, seed=0):
    """The uniform draws a method makes for one module: per task, from a generator seeded by
    the module and the task's index (the seed rule is part of the contract)."""
    from loramerge.methods.spaces import task_seed

    gens = [torch.Generator().manual_seed(task_seed(_module_seed(seed, key), i)) for i in range(shape[0])]
    return torch.stack([torch.rand(shape[1:], generator=g, dtype=F64) for g in gens])


def test_dare_with_the_same_mask():
    loras = make(TASKS, 2)
    t = taus(loras, WEIGHTS)
    mask = (_rand(t.shape, KEY) < 0.6).to(F64)
    dropped = t * mask / 0.6
    got = run(loras, WEIGHTS, "dare_linear", rank=11, density=0.6, **FULL)
    assert rel(got[KEY].delta(F64), dropped.sum(0)) < 1e-10
    got = run(loras, WEIGHTS, "dare_ties", rank=11, density=0.6, **FULL)
    assert rel(got[KEY].delta(F64), ref_ties(dropped)) < 1e-10


def test_della():
    loras = make(TASKS, 3)
    t = taus(loras, WEIGHTS)
    d, eps = 0.5, 0.2
    n = t.shape[-1]
    p = torch.empty_like(t)
    for i in range(t.shape[0]):
        for r in range(t.shape[1]):
            order = t[i, r].abs().argsort()  # ascending: rank 1 … n
            for rank, j in enumerate(order, start=1):
                p[i, r, j] = (d - eps) + 2 * eps * (rank - 1) / (n - 1)
    keep = _rand(t.shape, KEY) < p
    dropped = torch.where(keep, t / p, torch.zeros_like(t))
    got = run(loras, WEIGHTS, "della", rank=11, density=d, epsilon=eps, **FULL)
    assert rel(got[KEY].delta(F64), ref_ties(dropped)) < 1e-10


def test_core_space_linear_is_exact_and_disjoint_ties_is_the_sum():
    loras = make(TASKS, 4)
    exact = run(loras, WEIGHTS, "linear", compute_dtype=torch.float32)
    core = run(loras, WEIGHTS, "task_arithmetic", space="core", compute_dtype=torch.float32)
    for key in (KEY, KEY2):
        assert rel(core[key].delta(F64), exact[key].delta(F64)) < 1e-6
    # two LoRAs whose deltas touch disjoint rows and columns
    gen = torch.Generator().manual_seed(5)
    a_up, a_down = torch.zeros(14, 3, dtype=F64), torch.zeros(3, 11, dtype=F64)
    b_up, b_down = torch.zeros(14, 2, dtype=F64), torch.zeros(2, 11, dtype=F64)
    a_up[:7], a_down[:, :5] = torch.randn(7, 3, generator=gen, dtype=F64), torch.randn(3, 5, generator=gen, dtype=F64)
    b_up[7:], b_down[:, 5:] = torch.randn(7, 2, generator=gen, dtype=F64), torch.randn(2, 6, generator=gen, dtype=F64)
    name = KEY.split(".", 1)[1]
    la = LoRA([LoraModule.from_factors("unet", name, a_up, a_down, (14, 11), 3.0)], "sd1")
    lb = LoRA([LoraModule.from_factors("unet", name, b_up, b_down, (14, 11), 2.0)], "sd1")
    got = run([la, lb], [0.9, -0.6], "ties", space="core", density=1.0)
    expected = 0.9 * la[KEY].delta(F64) - 0.6 * lb[KEY].delta(F64)
    assert rel(got[KEY].delta(F64), expected) < 1e-10


def canonical_pairs(stack):
    """Each task τᵢ as (Uᵢ√σᵢ, √σᵢVᵢᵀ) from a dense SVD, zero singular values dropped: the
    factorisation Core Space and KnOTS take (signs do not matter: only Uᵢ√σᵢ·√σᵢVᵢᵀ and
    BBᵀ = Σ Uᵢσᵢ Uᵢᵀ enter the bases and cores)."""
    pairs = []
    for t in stack:
        U, S, Vh = torch.linalg.svd(t, full_matrices=False)
        k = int((S > S[0] * max(t.shape) * torch.finfo(F64).eps).sum())
        root = S[:k].sqrt()
        pairs.append((U[:, :k] * root, root[:, None] * Vh[:k]))
    return pairs


def test_core_space_ties_matches_its_definition():
    """Core Space: project onto the stacked factors' singular bases, TIES there, map back;
    each task enters with its canonical factors, so the result is a function of the τᵢ."""
    loras = make(TASKS, 6)
    ups, downs = zip(*canonical_pairs(taus(loras, WEIGHTS)))
    U_B = torch.linalg.svd(torch.cat(ups, 1), full_matrices=False)[0]
    V_A = torch.linalg.svd(torch.cat(downs, 0), full_matrices=False)[2]
    cores = torch.stack([U_B.T @ u @ d @ V_A.T for u, d in zip(ups, downs)])
    expected = U_B @ ref_ties(cores, 0.5) @ V_A
    got = run(loras, WEIGHTS, "ties", space="core", density=0.5)
    # singular vectors are defined up to sign; TIES on the core is sign-equivariant, so the
    # product is the same whichever signs the SVD picked
    assert rel(got[KEY].delta(F64), expected) < 1e-9


def dense_knots(stack, density, lam=1.0):
    cat = torch.cat(list(stack), dim=1)
    U, S, Vh = torch.linalg.svd(cat, full_matrices=False)
    k = int((S > S[0] * max(cat.shape) * torch.finfo(torch.float32).eps).sum())
    n = stack.shape[-1]
    blocks = torch.stack([S[:k, None] * Vh[:k, i * n:(i + 1) * n] for i in range(stack.shape[0])])
    return lam * U[:, :k] @ ref_ties(blocks, density)


def test_knots_factored_equals_dense_per_layer():
    loras = make(TASKS, 7)
    got = run(loras, WEIGHTS, "knots", density=0.3, topk_scope="layer", **{"lambda": 0.9})
    for key in (KEY, KEY2):
        assert rel(got[key].delta(F64), dense_knots(taus(loras, WEIGHTS, key), 0.3, 0.9)) < 1e-6


def test_knots_global_top_k_spans_all_layers():
    loras = make(TASKS, 8)
    got = run(loras, WEIGHTS, "knots", density=0.3, topk_scope="global")
    per_key = {}
    for key in (KEY, KEY2):
        cat = torch.cat(list(taus(loras, WEIGHTS, key)), dim=1)
        U, S, Vh = torch.linalg.svd(cat, full_matrices=False)
        k = int((S > S[0] * max(cat.shape) * torch.finfo(torch.float32).eps).sum())
        n = cat.shape[1] // 3
        per_key[key] = (U[:, :k], torch.stack([S[:k, None] * Vh[:k, i * n:(i + 1) * n] for i in range(3)]))
    thresholds = []
    for i in range(3):  # top 30% of each task's entries over both layers together
        values = torch.cat([per_key[k][1][i].abs().reshape(-1) for k in per_key])
        thresholds.append(values.sort(descending=True).values[int(0.3 * values.numel()) - 1])
    for key, (U, blocks) in per_key.items():
        trimmed = torch.stack([b * (b.abs() >= th) for b, th in zip(blocks, thresholds)])
        expected = U @ ref_ties(trimmed)
        assert rel(got[key].delta(F64), expected) < 1e-6


def polar(x):
    u, _, vh = torch.linalg.svd(x, full_matrices=False)
    return u @ vh


def test_tsv():
    loras = make(TASKS, 9)
    t = taus(loras, WEIGHTS)
    per_task = sum(r for r, _ in TASKS) // 3  # budget Σr = 9 → 3 triplets per task (capped by rank)
    Us, Ss, Vs = [], [], []
    for x, (r, _) in zip(t, TASKS):
        U, S, Vh = torch.linalg.svd(x, full_matrices=False)
        k = min(per_task, r)
        Us.append(U[:, :k]), Ss.append(S[:k]), Vs.append(Vh[:k])
    U, S, Vh = torch.cat(Us, 1), torch.cat(Ss), torch.cat(Vs, 0)
    expected = 1.3 * polar(U) @ torch.diag(S) @ polar(Vh.T).T
    got = run(loras, WEIGHTS, "tsv", **{"lambda": 1.3})
    assert rel(got[KEY].delta(F64), expected) < 1e-8


def test_iso_c_averages_only_nonzero_singular_values():
    loras = make(TASKS, 10)
    total = taus(loras, WEIGHTS).sum(0)
    U, S, Vh = torch.linalg.svd(total, full_matrices=False)
    r = 9  # Σ ranks: the other singular values of the 14×11 sum are zero
    assert S[r] < 1e-10 * S[0]
    expected = S[:r].mean() * U[:, :r] @ Vh[:r]
    got = run(loras, WEIGHTS, "iso_c")
    assert rel(got[KEY].delta(F64), expected) < 1e-8
    wrong = S.mean() * U[:, :r] @ Vh[:r]  # averaging the zeros in too: too small
    assert rel(got[KEY].delta(F64), wrong) > 0.1


def test_iso_cts():
    loras = make(TASKS, 11)
    t = taus(loras, WEIGHTS)
    D, T, f = 9, 3, 0.5
    k_c = int(D * f)
    k_c = D - round((D - k_c) / T) * T
    n_t = (D - k_c) // T
    U, S, Vh = torch.linalg.svd(t.sum(0), full_matrices=False)
    Uc, Sc, Vc = U[:, :k_c], S[:k_c], Vh[:k_c]
    Us, Ss, Vs = [], [], []
    for x in t:
        u, s, vh = torch.linalg.svd(x - Uc @ (Uc.T @ x), full_matrices=False)
        Us.append(u[:, :n_t]), Ss.append(s[:n_t]), Vs.append(vh[:n_t])
    Us.append(Uc), Ss.append(Sc), Vs.append(Vc)
    Ucat, Scat, Vcat = torch.cat(Us, 1), torch.cat(Ss), torch.cat(Vs, 0)
    expected = Scat.mean() * polar(Ucat) @ polar(Vcat.T).T
    got = run(loras, WEIGHTS, "iso_cts", common_fraction=f)
    assert rel(got[KEY].delta(F64), expected) < 1e-8


# --------------------------------------------------------------------------------------------
# PEFT's *_svd combination types


def _peft(loras, weights, combination, density, rank):
    from peft import LoraConfig, get_peft_model

    class Two(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.q = torch.nn.Linear(11, 14, bias=False)

    model = None
    for i, l in enumerate(loras):
        m = l[KEY]
        config = LoraConfig(r=m.rank, lora_alpha=m.alpha, target_modules=["q"], init_lora_weights=False)
        name = f"task{i}"
        if model is None:
            model = get_peft_model(Two().double(), config, adapter_name=name)
        else:
            model.add_adapter(name, config)
        layer = model.base_model.model.q
        up, down = m.factors(F64)
        layer.lora_A[name].weight.data = down.clone()
        layer.lora_B[name].weight.data = up.clone()
    model.add_weighted_adapter([f"task{i}" for i in range(len(loras))], weights, "m",
                               combination_type=combination, density=density, svd_rank=rank)
    return model.base_model.model.q.get_delta_weight("m").detach()


@pytest.mark.parametrize("ours, theirs", [("ties", "ties_svd"), ("magnitude_prune", "magnitude_prune_svd")])
def test_peft_svd_types_agree(ours, theirs):
    """Convention: PEFT trims each adapter's scaled delta sᵢBᵢAᵢ, elects signs on the
    *unweighted* trimmed deltas, then takes Σwᵢτ̃ᵢ over agreeing entries / their count, and
    truncates by SVD to svd_rank (new adapter: alpha = r, scale 1). We fold the weights in
    first (the issue's τᵢ = wᵢΔWᵢ), so the two agree whenever the weights are equal."""
    loras = make(TASKS[:2], 12)
    weights, density, rank = [0.8, 0.8], 0.5, 6
    theirs_delta = _peft(loras, weights, theirs, density, rank)
    got = run(loras, weights, ours, rank=rank, density=density, **FULL)
    assert rel(got[KEY].delta(F64), theirs_delta) < 1e-6  # PEFT holds the weights in float32


# --------------------------------------------------------------------------------------------
# rank budgets and density


def test_tsv_rank_is_at_most_the_requested_rank():
    """TSV splits --rank N evenly: ⌊N/T⌋ triplets per task, never more than N in all. With
    fewer than one per task there is nothing to split: a one-line error, not rank T."""
    loras = make(TASKS, 13)
    for rank in (3, 4, 5):
        got = run(loras, WEIGHTS, "tsv", rank=rank)
        assert got[KEY].rank == 3 * (rank // 3) <= rank
    with pytest.raises(loramerge.LoraMergeError) as err:
        run(loras, WEIGHTS, "tsv", rank=2)
    assert "\n" not in str(err.value) and "--rank 3" in str(err.value)


def test_breadcrumbs_keeps_density_when_density_plus_gamma_exceeds_one():
    """density + γ > 1: keep int(density·N) entries per task, dropping only the N − int(density·N)
    largest (mergekit's magnitude_outliers does the same); density is the promise."""
    loras = make(TASKS, 14)
    t = taus(loras, WEIGHTS)
    got = run(loras, WEIGHTS, "breadcrumbs", rank=11, density=0.7, gamma=0.5, **FULL)
    expected = torch.stack([crumbs(x, 0.7, 0.5) for x in t]).sum(0)
    assert int((crumbs(t[0], 0.7, 0.5) != 0).sum()) == int(0.7 * t[0].numel())
    assert rel(got[KEY].delta(F64), expected) < 1e-10
