"""SVD merge of two SDXL UNet LoRAs: loramerge (factored) vs PEFT add_weighted_adapter (dense).

Builds two kohya-format LoRAs on all 722 attention/ff/proj modules of the SDXL UNet (ranks 32
and 16, random factors), then, in one run with one thread:
  1. times `loramerge merge a:0.7 b:0.5 --method svd --rank 32` file to file (a subprocess:
     process start, imports, reading, merging and writing all included);
  2. times PEFT's `add_weighted_adapter(combination_type="svd", svd_rank=32)` on one module of
     each distinct shape (full_matrices=True, its default, and False), and extrapolates to all
     722 modules by multiplying each shape's time by its module count (said in the output);
  3. checks loramerge's result against a dense float64 truncated SVD of the summed delta on
     those modules (max relative error).
Run: python bench/svd_merge.py [--keep DIR]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import common  # noqa: E402  (one thread)
import torch  # noqa: E402

import loramerge  # noqa: E402

WEIGHTS = (0.7, 0.5)
RANK = 32


def time_loramerge(a: Path, b: Path, out: Path, *extra: str) -> float:
    cmd = [sys.executable, "-m", "loramerge", "merge", f"{a}:{WEIGHTS[0]}", f"{b}:{WEIGHTS[1]}",
           "--method", "svd", "--rank", str(RANK), "--threads", "1", "-o", str(out), *extra]
    start = time.perf_counter()
    subprocess.run(cmd, check=True, capture_output=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    return time.perf_counter() - start


def time_peft(la, lb, name: str, full_matrices: bool) -> tuple[float, torch.Tensor]:
    """PEFT's svd merge of one module: (seconds, merged ΔW)."""
    model, layer = common.peft_pair(la, lb, name)
    start = time.perf_counter()
    model.add_weighted_adapter(["first", "second"], list(WEIGHTS), "merged", combination_type="svd",
                               svd_rank=RANK, svd_full_matrices=full_matrices)
    seconds = time.perf_counter() - start
    return seconds, layer.get_delta_weight("merged").detach().double()


def dense_reference(la, lb, name: str) -> torch.Tensor:
    total = sum(w * m.delta(torch.float64).reshape(m.out_features, -1)
                for w, m in zip(WEIGHTS, (la[f"unet.{name}"], lb[f"unet.{name}"])))
    U, S, Vh = torch.linalg.svd(total, full_matrices=False)
    return (U[:, :RANK] * S[:RANK]) @ Vh[:RANK]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--keep", type=Path, help="write the LoRAs here instead of a temp folder")
    parser.add_argument("--skip-full-matrices", action="store_true", help="skip PEFT's slower default path")
    args = parser.parse_args()
    folder = args.keep or Path(tempfile.mkdtemp(prefix="loramerge-bench-"))
    folder.mkdir(parents=True, exist_ok=True)

    a, b, targets = common.sdxl_pair(folder)
    print(f"inputs: 2 SDXL UNet LoRAs, 722 modules, ranks 32 and 16, fp16 ({a.stat().st_size / 2**20:.0f} MiB, "
          f"{b.stat().st_size / 2**20:.0f} MiB); torch threads = {torch.get_num_threads()}")

    ours = time_loramerge(a, b, folder / "merged.safetensors")
    print(f"loramerge merge --method svd --rank {RANK}, file to file (fp16 out, like the inputs): {ours:.2f} s")
    ours32 = time_loramerge(a, b, folder / "merged32.safetensors", "--dtype", "fp32")
    print(f"loramerge merge ... --dtype fp32 (for the error check below): {ours32:.2f} s")

    la, lb = loramerge.load(a), loramerge.load(b)
    merged = loramerge.load(folder / "merged32.safetensors")
    merged16 = loramerge.load(folder / "merged.safetensors")
    worst16 = 0.0
    shapes, counts = common.one_per_shape(targets)
    print(f"PEFT add_weighted_adapter(svd) on one module of each of {len(shapes)} distinct shapes, "
          "extrapolated to 722 modules by shape counts:")
    totals = {True: 0.0, False: 0.0}
    worst_ours, worst_peft = 0.0, 0.0
    for shape, name in shapes.items():
        reference = dense_reference(la, lb, name)
        mine = merged[f"unet.{name}"].delta(torch.float64).reshape(reference.shape)
        worst_ours = max(worst_ours, float((mine - reference).norm() / reference.norm()))
        mine16 = merged16[f"unet.{name}"].delta(torch.float64).reshape(reference.shape)
        worst16 = max(worst16, float((mine16 - reference).norm() / reference.norm()))
        line = f"  {str(shape):<18} ×{counts[shape]:>3}"
        for full in ((False,) if args.skip_full_matrices else (False, True)):
            seconds, theirs = time_peft(la, lb, name, full)
            totals[full] += seconds * counts[shape]
            worst_peft = max(worst_peft, float((theirs - reference).norm() / reference.norm()))
            line += f"  full_matrices={full!s:<5} {seconds:7.3f} s"
        print(line)
    print(f"max relative error (‖·‖_F) vs dense truncated SVD in float64: loramerge fp32 file {worst_ours:.2e}, "
          f"PEFT (fp32, in memory) {worst_peft:.2e}; loramerge fp16 file {worst16:.2e} (fp16 rounding, ε = 9.8e-4)")
    print(f"PEFT, all 722 modules (extrapolated): thin SVD {totals[False]:.0f} s"
          + ("" if args.skip_full_matrices else f", full_matrices=True {totals[True]:.0f} s"))
    print(f"speed-up, loramerge vs PEFT thin: {totals[False] / ours:.0f}x"
          + ("" if args.skip_full_matrices else f"; vs PEFT default: {totals[True] / ours:.0f}x"))
    print(f"target: loramerge under 10 s ({'met' if ours < 10 else 'MISSED'}), "
          f"error below 1e-4 ({'met' if worst_ours < 1e-4 else 'MISSED'})")


if __name__ == "__main__":
    main()
