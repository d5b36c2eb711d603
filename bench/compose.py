"""The composition benchmark: which merge keeps each LoRA's effect, in the tiny digit world.

For every pair of the bundled style LoRAs and every merge method (plus the live weighted mix),
generates a fixed number of samples per digit with both trigger words and reports digit
accuracy, each style's retention relative to that LoRA alone, and the composition score
(digit accuracy × the smaller retention; see loramerge.tinyworld.composition). Seeds are fixed, so a
rerun prints the same table. Writes compose.md, compose.csv and compose.png into --out.
The last row applies both styles' transforms to held-out real digits: the ceiling the
detectors allow for each pair, not a merge.
Run: python bench/compose.py [--out DIR] [--samples 10]
"""

from __future__ import annotations

import argparse
import csv
import itertools
import time
from pathlib import Path

import torch

from loramerge import tinyworld as tw
from loramerge.tinyworld import composition as comp

# (label, method, extra parameters)
MIXES = [
    ("linear", "linear", {}),
    ("svd, half rank", "svd", {}),
    ("ties (core)", "ties", {"space": "core"}),
    ("ties (full)", "ties", {"space": "full"}),
    ("dare_ties (core)", "dare_ties", {"space": "core"}),
    ("della (core)", "della", {"space": "core"}),
    ("breadcrumbs (core)", "breadcrumbs", {"space": "core"}),
    ("magnitude_prune (core)", "magnitude_prune", {"space": "core"}),
    ("knots", "knots", {}),
    ("tsv", "tsv", {}),
    ("iso_c", "iso_c", {}),
    ("iso_cts", "iso_cts", {}),
]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, default=Path("compose-results"))
    parser.add_argument("--samples", type=int, default=10, help="samples per digit")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(2)
    args.out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    pipe = tw.load_pipeline()
    loras = comp.load_styles(tw.STYLES)
    alone = {s: score for s, (score, _) in comp.alone_rates(pipe, loras, args.samples, args.seed).items()}
    rows = []
    for a, b in itertools.combinations(tw.STYLES, 2):
        denominators = {a: alone[a].hits[a], b: alone[b].hits[b]}
        pair = [loras[a], loras[b]]
        reduced = max(m.rank for lora in pair for m in lora) // 2
        for label, method, params in MIXES:
            merged = comp.merged_for(method, pair, [1.0, 1.0], reduced_rank=reduced, **params)
            with comp.with_mix(pipe, {"m": merged}, {"m": 1.0}):
                score, _ = comp.measure(pipe, label, (a, b), args.samples, args.seed, denominators)
            rows.append({"pair": f"{a}+{b}", **score.row()})
        with comp.with_mix(pipe, {a: loras[a], b: loras[b]}, {a: 1.0, b: 1.0}):
            score, _ = comp.measure(pipe, "live mix", (a, b), args.samples, args.seed, denominators)
        rows.append({"pair": f"{a}+{b}", **score.row()})
        rows.append({"pair": f"{a}+{b}", **comp.real_reference((a, b)).row()})
        print(f"{a}+{b} done ({time.perf_counter() - start:.0f} s)", flush=True)
    write_outputs(rows, alone, args)
    print(f"wrote {args.out}/compose.md, compose.csv, compose.png in {time.perf_counter() - start:.0f} s")


def write_outputs(rows, alone, args) -> None:
    fields = ["pair", "mix", "digit_accuracy", "composition"]
    with open(args.out / "compose.csv", "w", newline="") as f:
        keys = sorted({k for r in rows for k in r}, key=lambda k: (k not in fields, fields.index(k) if k in fields else 0, k))
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)
    mixes = list(dict.fromkeys(r["mix"] for r in rows))
    pairs = list(dict.fromkeys(r["pair"] for r in rows))
    lines = ["# Composition benchmark", "",
             f"{args.samples} samples per digit, seed {args.seed}. Cells: composition score "
             "(digit accuracy × the smaller style retention). LoRA alone, own trigger: "
             + ", ".join(f"{s} hits {v.hits[s]:.2f} (digits {v.accuracy:.2f})" for s, v in alone.items()), "",
             "| mix | " + " | ".join(pairs) + " | mean |", "|---|" + "---:|" * (len(pairs) + 1)]
    means = {}
    for mix in mixes:
        values = [next(r["composition"] for r in rows if r["mix"] == mix and r["pair"] == p) for p in pairs]
        means[mix] = sum(values) / len(values)
        lines.append(f"| {mix} | " + " | ".join(f"{v:.2f}" for v in values) + f" | **{means[mix]:.2f}** |")
    (args.out / "compose.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4))
    order = sorted(mixes, key=lambda m: means[m])
    ax.barh(order, [means[m] for m in order], color=["#999999" if m.startswith("real") else "#4a7ab8" for m in order])
    ax.set_xlabel("mean composition score over style pairs")
    ax.set_xlim(0, 1)
    fig.tight_layout()
    fig.savefig(args.out / "compose.png", dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
