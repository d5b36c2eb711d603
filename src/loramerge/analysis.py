"""``loramerge analyze``: how LoRAs relate before you merge them, per block.

- cosine similarity of the deltas, ⟨ΔWᵢ, ΔWⱼ⟩ / (‖ΔWᵢ‖‖ΔWⱼ‖) summed over a block's modules,
  from the factors (Σ (BᵢᵀBⱼ) ⊙ (AᵢAⱼᵀ), no dense delta);
- sign-conflict rate at a density: of the entries both LoRAs keep after trimming to their
  top-density magnitudes, the fraction with opposite signs (what TIES has to resolve);
- singular spectra and effective rank exp(H(σ/Σσ)) (Roy & Vetterli 2007) per block;
- each LoRA's energy retained by a candidate merge: ‖U_mᵀ·ΔWᵢ·V_m‖²/‖ΔWᵢ‖², the share of
  LoRA i that lies in the merged delta's row and column spaces.
Writes ``analysis.json``, ``similarity.png`` (heatmap) and ``spectra.png`` into a folder.
"""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import torch

from . import linalg
from .errors import OutputPathError
from .outputs import Staged, check_output
from .lora import LoRA
from .formats import archs
from .report import block_of


def _pairs(n: int):
    return list(itertools.combinations(range(n), 2))


def _inner(a, b) -> float:
    (ua, da), (ub, db) = a, b
    return float(((ua.T @ ub) * (da @ db.T)).sum())


def _scaled(module):
    up, down = module.factors(torch.float64)
    return up * module.scale, down


def sign_conflict(da: torch.Tensor, db: torch.Tensor, density: float) -> tuple[int, int]:
    """(conflicting entries, entries both keep) after trimming each to its top density."""
    def keep(x):
        k = int(density * x.numel())
        mask = torch.zeros(x.numel(), dtype=torch.bool)
        if k:
            mask[x.abs().reshape(-1).topk(k).indices] = True
        return mask.reshape(x.shape)

    both = keep(da) & keep(db)
    conflict = both & (da.sign() != db.sign())
    return int(conflict.sum()), int(both.sum())


def effective_rank(S: torch.Tensor) -> float:
    p = S[S > 0].double()
    if p.numel() == 0:
        return 0.0
    p = p / p.sum()
    return float(torch.exp(-(p * p.log()).sum()))


def analyze(loras: list[LoRA], names: list[str], density: float = 0.2, merged: LoRA | None = None) -> dict:
    """Per-block statistics for the LoRAs (and a candidate merge, if given)."""
    keys = sorted(set().union(*(l.modules for l in loras)))
    spec = archs.spec(loras[0].arch)
    blocks: dict[str, dict] = {}
    spectra: dict[str, list[list[float]]] = {name: [] for name in names}
    for key in keys:
        present = [(i, l[key]) for i, l in enumerate(loras) if key in l]
        block = block_of(spec, present[0][1])
        entry = blocks.setdefault(block, {"modules": 0, "inner": {}, "norm_sq": [0.0] * len(loras),
                                          "conflicts": {}, "eff_rank": [[] for _ in loras],
                                          "retained": [[0.0, 0.0] for _ in loras]})
        entry["modules"] += 1
        factors = {i: _scaled(m) for i, m in present}
        for i, f in factors.items():
            entry["norm_sq"][i] += _inner(f, f)
            svd = linalg.svd_of_product(*f)
            entry["eff_rank"][i].append(effective_rank(svd.S))
            spectra[names[i]].append((svd.S / svd.S[0].clamp_min(1e-30)).tolist())
        dense = {i: (f[0] @ f[1]) for i, f in factors.items()}
        for i, j in _pairs(len(loras)):
            if i in factors and j in factors:
                pair = f"{i}-{j}"
                entry["inner"][pair] = entry["inner"].get(pair, 0.0) + _inner(factors[i], factors[j])
                c, b = sign_conflict(dense[i], dense[j], density)
                old = entry["conflicts"].get(pair, (0, 0))
                entry["conflicts"][pair] = (old[0] + c, old[1] + b)
        if merged is not None and key in merged:
            up, down = _scaled(merged[key])
            U = linalg.svd_of_product(up, down)
            for i, (ui, di) in factors.items():
                core = (U.U.T @ ui) @ (di @ U.Vh.T)
                entry["retained"][i][0] += float((core**2).sum())
                entry["retained"][i][1] += _inner((ui, di), (ui, di))
    return _finish(blocks, spectra, names, density, merged is not None)


def _finish(blocks, spectra, names, density, with_merge) -> dict:
    out = {"loras": names, "density": density, "blocks": {}}
    for block, e in blocks.items():
        row = {"modules": e["modules"], "norm": [math.sqrt(x) for x in e["norm_sq"]], "cosine": {},
               "sign_conflict": {}, "effective_rank": [sum(r) / len(r) if r else None for r in e["eff_rank"]]}
        for pair, inner in e["inner"].items():
            i, j = map(int, pair.split("-"))
            denom = math.sqrt(e["norm_sq"][i] * e["norm_sq"][j])
            row["cosine"][f"{names[i]}|{names[j]}"] = inner / denom if denom else 0.0
            c, b = e["conflicts"][pair]
            row["sign_conflict"][f"{names[i]}|{names[j]}"] = c / b if b else 0.0
        if with_merge:
            row["energy_retained"] = [r[0] / r[1] if r[1] else None for r in e["retained"]]
        out["blocks"][block] = row
    out["spectra"] = {name: _mean_curve(curves) for name, curves in spectra.items()}
    return out


def _mean_curve(curves: list[list[float]]) -> list[float]:
    if not curves:
        return []
    n = max(len(c) for c in curves)
    return [sum(c[k] for c in curves if k < len(c)) / sum(1 for c in curves if k < len(c)) for k in range(n)]


REPORT_FILES = ("analysis.json", "similarity.png", "spectra.png")


def report_paths(folder: Path, inputs=()) -> list[Path]:
    """The files :func:`write_report` writes, checked before anything is computed: a new
    folder's parent must exist; in an existing folder each file must be absent or a regular
    file, and none of ``inputs``."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise OutputPathError("--out must be a folder", folder)
    if not folder.exists():
        check_output(folder, folder=True)
    paths = [folder / name for name in REPORT_FILES]
    if folder.exists():
        for path in paths:
            check_output(path, inputs)
    return paths


def write_report(result: dict, folder: Path) -> list[Path]:
    """analysis.json, similarity.png (cosine and sign conflicts per block), spectra.png — all
    three renamed into place together once every one is complete (a failed plot leaves the
    previous report whole)."""
    paths = report_paths(folder)
    Path(folder).mkdir(exist_ok=True)
    with Staged(paths) as temps:
        temps[0].write_text(json.dumps(result, indent=2, allow_nan=False), encoding="utf-8")
        _plot_similarity(result, temps[1])
        _plot_spectra(result, temps[2])
    return paths


def _plot_similarity(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    blocks = list(result["blocks"])
    pairs = sorted({p for b in result["blocks"].values() for p in b["cosine"]})
    fig, axes = plt.subplots(1, 2, figsize=(4 + 2 * len(pairs), 1.5 + 0.3 * len(blocks)), squeeze=False)
    for ax, field, title, cmap, limits in (
        (axes[0][0], "cosine", "cosine similarity of ΔW", "RdBu_r", (-1, 1)),
        (axes[0][1], "sign_conflict", f"sign conflicts at density {result['density']}", "magma", (0, 1)),
    ):
        grid = [[result["blocks"][b][field].get(p, float("nan")) for p in pairs] for b in blocks]
        image = ax.imshow(grid, aspect="auto", cmap=cmap, vmin=limits[0], vmax=limits[1])
        ax.set_xticks(range(len(pairs)), [p.replace("|", "\n") for p in pairs], fontsize=7)
        ax.set_yticks(range(len(blocks)), blocks, fontsize=7)
        ax.set_title(title, fontsize=9)
        for y, row in enumerate(grid):
            for x, v in enumerate(row):
                if v == v:
                    ax.text(x, y, f"{v:.2f}", ha="center", va="center", fontsize=6)
        fig.colorbar(image, ax=ax, fraction=0.05)
    fig.tight_layout()
    fig.savefig(path, dpi=110, format="png")
    plt.close(fig)


def _plot_spectra(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, curve in result["spectra"].items():
        ax.plot(range(1, len(curve) + 1), curve, marker=".", label=name)
    ax.set_xlabel("singular value index")
    ax.set_ylabel("σ_k / σ_1 (mean over modules)")
    ax.set_yscale("log")
    ax.legend(fontsize=7)
    ax.set_title("singular spectra")
    fig.tight_layout()
    fig.savefig(path, dpi=110, format="png")
    plt.close(fig)
