"""`analyze`: the per-block numbers against dense computations, and the files it writes."""

import json
import subprocess
import sys

import torch

import loramerge
from loramerge.analysis import analyze, effective_rank
from loramerge.lora import LoRA, LoraModule

F64 = torch.float64


def test_numbers_match_dense_definitions(tmp_path):
    gen = torch.Generator().manual_seed(0)
    names = ["down_blocks.1.attentions.0.proj_in", "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"]
    loras = []
    for r, alpha in ((3, 6.0), (2, 1.0)):
        mods = [LoraModule.from_factors("unet", n, torch.randn(20, r, generator=gen, dtype=F64),
                                        torch.randn(r, 16, generator=gen, dtype=F64), (20, 16), alpha) for n in names]
        loras.append(LoRA(mods, "sd1"))
    merged = loramerge.merge(loras, method="svd", rank=2, device="cpu", compute_dtype=F64)
    result = analyze(loras, ["a", "b"], density=0.3, merged=merged)
    row = result["blocks"]["unet.down_blocks.1"]
    da = [loras[0][f"unet.{n}"].delta(F64) for n in names]
    db = [loras[1][f"unet.{n}"].delta(F64) for n in names]
    inner = sum(float((x * y).sum()) for x, y in zip(da, db))
    norms = (sum(float((x**2).sum()) for x in da) * sum(float((y**2).sum()) for y in db)) ** 0.5
    assert abs(row["cosine"]["a|b"] - inner / norms) < 1e-9

    def keep(x):
        k = int(0.3 * x.numel())
        mask = torch.zeros(x.numel(), dtype=torch.bool)
        mask[x.abs().reshape(-1).argsort(descending=True)[:k]] = True
        return mask.reshape(x.shape)

    both = sum(int((keep(x) & keep(y)).sum()) for x, y in zip(da, db))
    conflicts = sum(int((keep(x) & keep(y) & (x.sign() != y.sign())).sum()) for x, y in zip(da, db))
    assert abs(row["sign_conflict"]["a|b"] - conflicts / both) < 1e-12

    S = torch.linalg.svdvals(da[0])[:3]
    p = S / S.sum()
    assert abs(effective_rank(S) - float(torch.exp(-(p * p.log()).sum()))) < 1e-9

    kept, total = 0.0, 0.0
    for n, x in zip(names, da):
        U, _, Vh = torch.linalg.svd(merged[f"unet.{n}"].delta(F64), full_matrices=False)
        kept += float(((U[:, :2].T @ x @ Vh[:2].T) ** 2).sum())
        total += float((x**2).sum())
    assert abs(row["energy_retained"][0] - kept / total) < 1e-8


def test_cli_writes_json_and_plots(tmp_path):
    examples = __import__("importlib.resources").resources.files("loramerge") / "examples"
    proc = subprocess.run([sys.executable, "-m", "loramerge", "analyze", str(examples / "style.safetensors"),
                           str(examples / "subject.safetensors"), "--out", str(tmp_path / "an")],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    data = json.loads((tmp_path / "an" / "analysis.json").read_text())
    assert data["loras"] == ["style", "subject"] and "unet.mid_block" in data["blocks"]
    for png in ("similarity.png", "spectra.png"):
        assert (tmp_path / "an" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
