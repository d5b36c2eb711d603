"""Every merge method on two SDXL UNet LoRAs (722 modules, ranks 32 and 16), one thread.

Times each method file to file (lazy reading, merging, writing) in core and full space where
the method has both, against PEFT's add_weighted_adapter(combination_type="ties_svd") timed
on one module of each distinct shape and extrapolated to all 722 by shape counts (said in the
output). Targets: ties (density 0.5, rank 32) under 15 s in core space, under 120 s in full.
Run: python bench/methods.py [--keep DIR] [--quick]   (--quick: full space for ties only)
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import common  # noqa: F401  (one thread)
import torch

import loramerge
from loramerge.methods import METHODS

WEIGHTS = [0.7, 0.5]
SPARSIFYING = ["task_arithmetic", "ties", "dare_linear", "dare_ties", "magnitude_prune", "breadcrumbs", "della"]
FACTORED = ["linear", "svd", "knots", "tsv", "iso_c", "iso_cts"]


def run(a, b, out: Path, method: str, **kw) -> tuple[float, dict]:
    start = time.perf_counter()
    merged = loramerge.merge([a, b], weights=WEIGHTS, method=method, device="cpu", **kw)
    loramerge.save(merged, out)
    return time.perf_counter() - start, merged.stats


def peft_ties_svd(la, lb, name: str) -> float:
    model, _ = common.peft_pair(la, lb, name)
    start = time.perf_counter()
    model.add_weighted_adapter(["first", "second"], WEIGHTS, "m", combination_type="ties_svd", density=0.5,
                               svd_rank=32, svd_full_matrices=False)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--keep", type=Path)
    parser.add_argument("--quick", action="store_true", help="full space for ties only")
    args = parser.parse_args()
    folder = args.keep or Path(tempfile.mkdtemp(prefix="loramerge-bench-"))
    folder.mkdir(parents=True, exist_ok=True)
    a, b, targets = common.sdxl_pair(folder)
    print(f"two SDXL UNet LoRAs, 722 modules, ranks 32 and 16; torch threads {torch.get_num_threads()}")

    rows = []
    ties_core, _ = run(a, b, folder / "o.safetensors", "ties", density=0.5, rank=32, space="core")
    ties_full, stats = run(a, b, folder / "o.safetensors", "ties", density=0.5, rank=32, space="full")
    errors = [s["refactor_error"] for s in stats.values()]
    rows.append(("ties (density 0.5, rank 32)", ties_core, ties_full))

    la, lb = loramerge.load(a), loramerge.load(b)
    shapes, counts = common.one_per_shape(targets)
    peft_total = sum(peft_ties_svd(la, lb, name) * counts[shape] for shape, name in shapes.items())

    for method in SPARSIFYING:
        if method == "ties":
            continue
        extra = {"density": 0.6, "epsilon": 0.1} if method == "della" else {}
        core, _ = run(a, b, folder / "o.safetensors", method, rank=32, space="core", **extra)
        full = None if args.quick else run(a, b, folder / "o.safetensors", method, rank=32, space="full", **extra)[0]
        rows.append((method, core, full))
    for method in FACTORED:
        kw = {"rank": 32} if METHODS[method].uses_rank else {}
        rows.append((method, run(a, b, folder / "o.safetensors", method, **kw)[0], None))

    print()
    print("| method | core space / factored (s) | full space (s) |")
    print("|---|---:|---:|")
    for name, core, full in rows:
        print(f"| {name} | {core:.1f} | {'' if full is None else f'{full:.1f}'} |")
    print()
    print(f"PEFT add_weighted_adapter(ties_svd, density 0.5, svd_rank 32, thin SVD), all 722 modules "
          f"(extrapolated from one module per shape): {peft_total:.0f} s")
    print(f"ties full-space re-factorisation error (rank 32): max {max(errors):.3f}, mean {sum(errors) / len(errors):.3f}")
    print(f"ties core {ties_core:.1f} s (target < 15: {'met' if ties_core < 15 else 'MISSED'}), "
          f"full {ties_full:.1f} s (target < 120: {'met' if ties_full < 120 else 'MISSED'}); "
          f"speed-up vs PEFT: core {peft_total / ties_core:.0f}x, full {peft_total / ties_full:.1f}x")


if __name__ == "__main__":
    main()
