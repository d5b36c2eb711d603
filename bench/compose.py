"""The composition benchmark: which merge or composition keeps each LoRA's effect, in the tiny
digit world.

For every pair of the bundled style LoRAs, generates a fixed number of samples per digit with
both trigger words and reports digit accuracy, each style's retention relative to that LoRA
alone, and the composition score (digit accuracy × the smaller retention; see
loramerge.tinyworld.composition), for:
- every static merge method (merged, then patched in) and the live weighted mix;
- the inference-time methods of loramerge.compose (switch, composite, K-LoRA, a weight
  schedule; composite and switch with each LoRA's own prompt), at the default guidance and
  at twice it (with n LoRAs, the composite at guidance n·g is the sum of the LoRAs' guidance
  directions at g, as in composable diffusion); a static merge at twice the guidance as the
  control;
- the learned merges (ziplora, soups_cat), trained on prompts of digits 0-4;
- ``loramerge tune`` with a fixed budget on digits 0-4 (a static linear merge with weights and
  block weights; the own-prompt composite with weights and guidance).
Every row is also scored on the held-out digits 5-9 alone (column "5-9"): the fair column for
the tuned and learned rows. The last row applies both styles' transforms to held-out real
digits: the ceiling the detectors allow for each pair, not a method.
Seeds are fixed, so a rerun prints the same table. Writes compose.md, compose.csv and
compose.png into --out (atomically), and compose-partial.csv after each pair.
Run: python bench/compose.py [--out DIR] [--samples 10] [--budget 24] [--skip-learned] [--skip-tune]
     [--static linear,knots] [--pairs bold+slanted,...] [--combine DIR DIR ...]
"""

from __future__ import annotations

import argparse
import csv
import io
import itertools
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import loramerge
from loramerge import tinyworld as tw
from loramerge.tinyworld import composition as comp
from loramerge.atomic import atomic_write
from loramerge.tune import TuneConfig, tune

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
G = tw.DEFAULT_GUIDANCE
# (label, compose method, parameters, guidance scale); "{a}"/"{b}" name the pair's LoRAs
INFERENCE = [
    ("switch (tau 1)", "switch", {"tau": 1}, G),
    ("composite", "composite", {}, G),
    ("k-lora", "klora", {}, G),
    ("schedule: first early, second late", "schedule",
     {"weights": {"{a}": {"progress": [[0, 1.0], [1, 0.5]]}, "{b}": {"progress": [[0, 0.5], [1, 1.0]]}}}, G),
    ("composite, own prompts", "composite", {"prompts": "own"}, G),
    ("switch, own prompts, guidance x2", "switch", {"tau": 1, "prompts": "own"}, 2 * G),
    ("composite, guidance x2", "composite", {}, 2 * G),
    ("composite, own prompts, guidance x2", "composite", {"prompts": "own"}, 2 * G),
]
HELD_OUT = (5, 6, 7, 8, 9)
TUNE_DIGITS = (0, 1, 2, 3, 4)


def subset(images, digits, keep):
    mask = np.isin(np.asarray(digits), keep)
    return images[torch.from_numpy(mask)], np.asarray(digits)[mask]


class Pair:
    def __init__(self, pipe, styles, loras, alone_images, samples, seed):
        self.pipe, self.styles, self.samples, self.seed = pipe, styles, samples, seed
        self.loras = {s: loras[s] for s in styles}
        self.alone = {}
        for s in styles:
            images, digits = alone_images[s]
            self.alone[s] = comp.score_images(s, images, digits, [s]).hits[s]
            held = subset(images, digits, HELD_OUT)
            self.alone[s + "@held"] = comp.score_images(s, *held, [s]).hits[s]
        self.rows = []

    def score(self, label, images, digits, kind, note=""):
        both = comp.score_images(label, images, digits, self.styles, {s: self.alone[s] for s in self.styles})
        held = comp.score_images(label, *subset(images, digits, HELD_OUT), self.styles,
                                 {s: self.alone[s + "@held"] for s in self.styles})
        row = {"pair": "+".join(self.styles), "kind": kind, **both.row(), "composition_5_9": round(held.composition, 4),
               "digit_accuracy_5_9": round(held.accuracy, 4), "note": note}
        self.rows.append(row)
        return row

    def generate(self, guidance=G):
        return comp.sample(self.pipe, self.styles, self.samples, self.seed, guidance)



def run_pair(pair: Pair, args, start) -> None:
    a, b = pair.styles
    loras = list(pair.loras.values())
    reduced = max(m.rank for lora in loras for m in lora) // 2
    chosen = [x.strip() for x in args.static.split(",")] if args.static else None
    for label, method, params in MIXES:
        if chosen is not None and label not in chosen:
            continue
        merged = comp.merged_for(method, loras, [1.0, 1.0], reduced_rank=reduced, **params)
        with comp.with_mix(pair.pipe, {"m": merged}, {"m": 1.0}):
            pair.score(label, *pair.generate(), "static")
    with comp.with_mix(pair.pipe, pair.loras, {a: 1.0, b: 1.0}):
        pair.score("live mix", *pair.generate(), "static")
        pair.score("live mix, guidance x2", *pair.generate(2 * G), "static")
    for label, method, params, guidance in INFERENCE:
        params = _fill(params, a, b)
        with loramerge.compose(pair.pipe, pair.loras, method=method, **params):
            pair.score(label, *pair.generate(guidance), "inference")
    if not args.skip_learned:
        base = str(tw.paths.pipeline_dir())
        templates = "|".join(tw.prompt(d) for d in TUNE_DIGITS)
        for method in ("ziplora", "soups_cat"):
            t0 = time.perf_counter()
            merged = loramerge.merge(loras, method=method, device="cpu", base=base, prompts=templates,
                                     steps=args.learn_steps, batch=2, sample_steps=tw.DEFAULT_STEPS, guidance=G)
            seconds = time.perf_counter() - t0
            with comp.with_mix(pair.pipe, {"m": merged}, {"m": 1.0}):
                pair.score(method, *pair.generate(), "learned", f"trained {seconds:.0f} s on prompts of digits 0-4")
    if not args.skip_tune:
        paths = [str(tw.lora_paths()[s]) for s in pair.styles]
        for label, method, space, fixed in (("tune: linear, weights + blocks", "linear", ("weights", "blocks"), {}),
                                            ("tune: composite, own prompts, weights + guidance", "compose:composite",
                                             ("weights", "guidance"), {"prompts": "own"})):
            config = TuneConfig(sources=paths, objective="tinyworld", method=method, space=space, budget=args.budget,
                                popsize=6, seed=args.seed, digits=TUNE_DIGITS, samples=args.tune_samples,
                                compose_params=fixed)
            t0 = time.perf_counter()
            with tempfile.TemporaryDirectory() as folder:
                result = tune(config, Path(folder), ray=args.ray)
            seconds = time.perf_counter() - t0
            best = result.best["candidate"]
            note = (f"best of {args.budget} trials on digits 0-4 ({seconds:.0f} s): "
                    + ", ".join(f"{k} {v:.2f}" for k, v in best["values"].items()))
            guidance = best.get("guidance_scale") or G
            if "compose" in best:
                settings = dict(best["compose"])
                kind = settings.pop("method")
                with loramerge.compose(pair.pipe, pair.loras, method=kind, weights=dict(zip(pair.styles, best["weights"])),
                                       **settings):
                    pair.score(label, *pair.generate(guidance), "tuned", note)
            else:
                merged = loramerge.merge(loras, best["weights"], method=best["method"], device="cpu",
                                         block_weights=best["block_weights"], **best["params"])
                with comp.with_mix(pair.pipe, {"m": merged}, {"m": 1.0}):
                    pair.score(label, *pair.generate(guidance), "tuned", note)
    real = comp.real_reference(pair.styles)
    pair.rows.append({"pair": "+".join(pair.styles), "kind": "reference", **real.row(),
                      "composition_5_9": float("nan"), "digit_accuracy_5_9": float("nan"), "note": "real digits"})
    print(f"{a}+{b} done ({time.perf_counter() - start:.0f} s)", flush=True)


def _fill(params, a, b):
    if "weights" not in params:
        return params
    names = {"{a}": a, "{b}": b}
    return {**params, "weights": {names[k]: v for k, v in params["weights"].items()}}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, default=Path("compose-results"))
    parser.add_argument("--samples", type=int, default=10, help="samples per digit")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--budget", type=int, default=24, help="tune: evaluations per pair and search")
    parser.add_argument("--tune-samples", type=int, default=6, help="tune: samples per digit of each evaluation")
    parser.add_argument("--learn-steps", type=int, default=40, help="ziplora / soups_cat optimisation steps")
    parser.add_argument("--skip-learned", action="store_true")
    parser.add_argument("--skip-tune", action="store_true")
    parser.add_argument("--ray", action="store_true", help="tune on a local Ray cluster")
    parser.add_argument("--pairs", help="comma list such as bold+slanted,shifted+small (default: all six)")
    parser.add_argument("--static", help="comma list of the static rows to run (labels as in the table; default: all)")
    parser.add_argument("--combine", nargs="+", type=Path,
                        help="write the tables from the compose-partial.csv of runs made with --pairs")
    args = parser.parse_args()
    torch.set_num_threads(1)
    args.out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    pipe = tw.load_pipeline()
    loras = comp.load_styles(tw.STYLES)
    alone_images, alone = {}, {}
    for s, lora in loras.items():
        with comp.with_mix(pipe, {s: lora}, {s: 1.0}):
            images, digits = comp.sample(pipe, [s], args.samples, args.seed)
        alone_images[s] = (images, digits)
        alone[s] = comp.score_images(f"{s} alone", images, digits, [s])
    if args.combine:
        write_outputs([row for folder in args.combine for row in _read_csv(folder / "compose-partial.csv")], alone, args)
        return
    pairs = list(itertools.combinations(tw.STYLES, 2))
    if args.pairs:
        chosen = {tuple(p.split("+")) for p in args.pairs.split(",")}
        pairs = [p for p in pairs if p in chosen]
    rows = []
    for styles in pairs:
        pair = Pair(pipe, styles, loras, alone_images, args.samples, args.seed)
        run_pair(pair, args, start)
        rows += pair.rows
        atomic_write(args.out / "compose-partial.csv", _csv(rows))
    write_outputs(rows, alone, args)
    print(f"wrote {args.out}/compose.md, compose.csv, compose.png in {time.perf_counter() - start:.0f} s")


def _read_csv(path: Path) -> list[dict]:
    def value(v):
        try:
            return float(v)
        except ValueError:
            return v

    with open(path, newline="") as f:
        return [{k: value(v) for k, v in row.items() if v != ""} for row in csv.DictReader(f)]


def _csv(rows) -> str:
    fields = ["pair", "kind", "mix", "digit_accuracy", "composition", "composition_5_9", "digit_accuracy_5_9"]
    keys = sorted({k for r in rows for k in r}, key=lambda k: (k not in fields, fields.index(k) if k in fields else 0, k))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=keys, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def write_outputs(rows, alone, args) -> None:
    atomic_write(args.out / "compose.csv", _csv(rows))
    mixes = list(dict.fromkeys(r["mix"] for r in rows))
    pairs = list(dict.fromkeys(r["pair"] for r in rows))

    def cell(mix, pair, key):
        return next((r[key] for r in rows if r["mix"] == mix and r["pair"] == pair), None)

    def kind_of(mix):
        return next(r["kind"] for r in rows if r["mix"] == mix)

    lines = ["# Composition benchmark", "",
             f"{args.samples} samples per digit, seed {args.seed}. Cells: composition score (digit accuracy × the "
             "smaller style retention), all digits; `5-9`: the mean over pairs on the held-out digits 5-9 alone "
             "(tuned and learned rows only saw digits 0-4); `acc`: mean digit accuracy. LoRA alone, own trigger: "
             + ", ".join(f"{s} hits {v.hits[s]:.2f} (digits {v.accuracy:.2f})" for s, v in alone.items()), "",
             "| kind | mix | " + " | ".join(pairs) + " | mean | 5-9 | acc |", "|---|---|" + "---:|" * (len(pairs) + 3)]
    means = {}
    for mix in mixes:  # a row run on some pairs only has its mean over those (marked *)
        values = [cell(mix, p, "composition") for p in pairs]
        present = [v for v in values if v is not None]
        means[mix] = sum(present) / len(present)
        held = np.nanmean([cell(mix, p, "composition_5_9") for p in pairs if cell(mix, p, "composition_5_9") is not None])
        accuracy = np.mean([v for v in (cell(mix, p, "digit_accuracy") for p in pairs) if v is not None])
        star = "" if len(present) == len(pairs) else "*"
        lines.append(f"| {kind_of(mix)} | {mix} | " + " | ".join("–" if v is None else f"{v:.2f}" for v in values)
                     + f" | **{means[mix]:.2f}**{star} | {held:.2f}{star} | {accuracy:.2f}{star} |")
    lines += ["", "Per pair, digit accuracy / retention of each style (all digits):", "",
              "| mix | " + " | ".join(pairs) + " |", "|---|" + "---|" * len(pairs)]
    for mix in mixes:
        cells = []
        for p in pairs:
            r = next((r for r in rows if r["mix"] == mix and r["pair"] == p), None)
            ret = [f"{r[k]:.2f}" for k in sorted(r) if k.startswith("retention_")] if r else []
            cells.append(f"{r['digit_accuracy']:.2f} / {' '.join(ret)}" if r else "–")
        lines.append(f"| {mix} | " + " | ".join(cells) + " |")
    notes = [f"- {r['mix']} ({r['pair']}): {r['note']}" for r in rows if r.get("note") and r["kind"] in ("tuned", "learned")]
    if notes:
        lines += ["", "Notes:", ""] + notes
    atomic_write(args.out / "compose.md", "\n".join(lines) + "\n")
    print("\n".join(lines))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 7))
    order = sorted(mixes, key=lambda m: means[m])
    colours = {"static": "#4a7ab8", "inference": "#e67e22", "learned": "#8e44ad", "tuned": "#27ae60", "reference": "#999999"}
    ax.barh(order, [means[m] for m in order], color=[colours[kind_of(m)] for m in order])
    ax.set_xlabel("mean composition score over style pairs (all digits)")
    ax.set_xlim(0, 1)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    atomic_write(args.out / "compose.png", buffer.getvalue())


if __name__ == "__main__":
    main()
