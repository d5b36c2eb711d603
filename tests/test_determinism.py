"""Every method writes the same bytes whatever torch's thread count.

MKL's QR, SVD (float64 too), long-sum GEMMs and dot products split their sums by thread count.
Each thread count runs in its own process (MKL keeps per-process state), on modules large
enough that BLAS does split them (1280×1280, 640×5120).
"""

import os
import subprocess
import sys
from pathlib import Path

import loramerge

SCRIPT = r"""
import sys
from pathlib import Path

import torch

torch.set_num_threads(int(sys.argv[1]))
import loramerge
from loramerge.lora import LoRA, LoraModule
from loramerge.methods import METHODS

SHAPES = {"mid_block.attentions.0.transformer_blocks.0.attn1.to_q": (1280, 1280),
          "mid_block.attentions.0.transformer_blocks.0.ff.net.2": (640, 5120)}


def lora(rank, seed):
    gen = torch.Generator().manual_seed(seed)
    mods = [LoraModule.from_factors("unet", name, torch.randn(m, rank, generator=gen),
                                    torch.randn(rank, n, generator=gen) / n ** 0.5, (m, n), rank / 2)
            for name, (m, n) in SHAPES.items()]
    return LoRA(mods, "sd1")


inputs = [lora(16, 1), lora(8, 2)]
out = Path(sys.argv[2])
for name, method in sorted(METHODS.items()):
    if method.learn is not None:  # trained on a pipeline: test_learned checks their bytes repeat
        continue
    spaces = ("core", "full") if any(p.name == "space" for p in method.params) else (None,)
    options = ({"rank": 12}, {"energy": 0.9}) if method.uses_rank else ({},)
    for space in spaces:
        for option in options:
            kw = dict(option, **({"space": space} if space else {}))
            merged = loramerge.merge(inputs, weights=[0.7, -0.5], method=name, device="cpu", **kw)
            tag = "-".join([name, space or "factored", *(f"{k}{v}" for k, v in option.items())])
            loramerge.save(merged, out / f"{tag}.safetensors")
"""


def _merge_all(threads: int, folder: Path) -> dict[str, bytes]:
    folder.mkdir()
    env = dict(os.environ, PYTHONPATH=str(Path(loramerge.__file__).parents[1]), SOURCE_DATE_EPOCH="0")
    subprocess.run([sys.executable, "-c", SCRIPT, str(threads), str(folder)], check=True, env=env, timeout=900)
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_every_method_writes_the_same_bytes_at_one_and_two_threads(tmp_path):
    one = _merge_all(1, tmp_path / "one")
    two = _merge_all(2, tmp_path / "two")
    assert len(one) >= 30 and one.keys() == two.keys()
    differing = sorted(name for name in one if one[name] != two[name])
    assert not differing, f"{len(differing)} of {len(one)} files differ: {', '.join(differing)}"
