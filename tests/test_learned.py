"""Learned merges (ZipLoRA, LoRA Soups CAT) on the tiny digit world's pipeline: the objective
falls, disjoint LoRAs are reproduced far better than by their plain sum, and the CLI writes a
plain LoRA, byte for byte the same on a rerun."""

from __future__ import annotations

import hashlib
import subprocess
import sys

import pytest
import torch

import loramerge
from loramerge import tinyworld as tw
from loramerge.errors import UsageError
from loramerge.lora import LoRA
from loramerge.methods import ModuleContext, Term, get_method
from loramerge.methods.learned import Learner

BASE = str(tw.paths.pipeline_dir())


def items_for(loras):
    keys = sorted(set().union(*(lora.modules for lora in loras)))
    out = []
    for key in keys:
        terms = [Term(lora[key], 1.0, i) for i, lora in enumerate(loras) if key in lora]
        out.append((terms, ModuleContext(key, terms[0].module.shape, None, None, torch.device("cpu"), 0)))
    return out


def test_ziplora_objective_falls_and_disjoint_loras_are_reproduced():
    bold, slanted = (loramerge.load(tw.lora_paths()[s]) for s in ("bold", "slanted"))
    # disjoint module sets: bold in the UNet's down blocks, slanted in its up blocks
    a = LoRA([m for m in bold if m.component == "unet" and "down_blocks" in m.name], "sd1", metadata=bold.metadata)
    b = LoRA([m for m in slanted if m.component == "unet" and "up_blocks" in m.name], "sd1", metadata=slanted.metadata)
    assert not set(a.modules) & set(b.modules)
    params = get_method("ziplora").resolve_params(
        dict(base=BASE, prompts="a handwritten seven|a handwritten three", steps=30, lr=0.02, sample_steps=4))
    learner = Learner("ziplora", [a, b], items_for([a, b]), params, seed=0)
    try:
        plain = learner.errors()  # coefficients 1: the plain sum of both LoRAs
        log = []
        coefficients = learner.fit(log=log)
        fitted = learner.errors()
    finally:
        learner.close()
    losses = [row["loss"] for row in log]
    assert sum(losses[-5:]) / 5 < 0.6 * sum(losses[:5]) / 5, losses
    for before, after in zip(plain, fitted):
        assert after < 0.5 * before, (plain, fitted)
    # ZipLoRA only rescales columns: one coefficient per input feature, per LoRA and module
    for key, values in coefficients.items():
        lora = a if key in a else b
        assert len(values) == 1 and values[0].shape == (lora[key].in_features,)


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "loramerge", *args], capture_output=True, text=True)


def test_learned_merge_cli_writes_a_plain_reproducible_lora(tmp_path):
    paths = [str(tw.lora_paths()[s]) for s in ("bold", "shifted")]
    outputs = []
    for run in range(2):
        out = tmp_path / f"zip{run}.safetensors"
        proc = _cli("merge", *paths, "--method", "ziplora", "--base", BASE, "--prompts", "a handwritten {trigger} seven",
                    "-p", "steps=2", "-p", "sample_steps=2", "-o", str(out))
        assert proc.returncode == 0, proc.stderr
        outputs.append(out)
    digests = [hashlib.sha256(p.read_bytes()).hexdigest() for p in outputs]
    assert digests[0] == digests[1]
    merged = loramerge.load(outputs[0])
    inputs = [loramerge.load(p) for p in paths]
    assert set(merged.modules) == set(inputs[0].modules) | set(inputs[1].modules)
    for key, module in merged.modules.items():
        assert module.rank <= sum(lora[key].rank for lora in inputs if key in lora)
    pipe = tw.load_pipeline()  # diffusers loads it as an ordinary kohya LoRA
    pipe.load_lora_weights(str(outputs[0]), adapter_name="zip")
    assert "zip" in pipe.get_list_adapters()["unet"]


def test_learned_methods_need_the_base():
    proc = _cli("merge", str(tw.lora_paths()["bold"]), str(tw.lora_paths()["small"]), "--method", "soups_cat", "-o", "x.safetensors")
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "--base" in proc.stderr
    with pytest.raises(UsageError):
        loramerge.merge([tw.lora_paths()["bold"], tw.lora_paths()["small"]], method="ziplora")


def test_soups_cat_learns_one_weight_per_module_and_lora():
    bold, small = (loramerge.load(tw.lora_paths()[s]) for s in ("bold", "small"))
    merged = loramerge.merge([bold, small], method="soups_cat", device="cpu", base=BASE, prompts="a handwritten two",
                             steps=3, sample_steps=2, lr=0.05)
    key = next(k for k in merged.modules if k in bold and k in small)
    expected_rank = bold[key].rank + small[key].rank
    assert merged[key].rank == expected_rank
    # ΔW = α₁·ΔW_bold + α₂·ΔW_small: solve for the two scalars, the fit is exact
    d = merged[key].delta().flatten()
    basis = torch.stack([bold[key].delta().flatten(), small[key].delta().flatten()], 1)
    alpha = torch.linalg.lstsq(basis, d.unsqueeze(1)).solution
    assert torch.allclose(basis @ alpha, d.unsqueeze(1), atol=1e-5 * d.abs().max())
    assert not torch.allclose(alpha, torch.ones_like(alpha))  # the weights moved from 1
