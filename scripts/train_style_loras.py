#!/usr/bin/env python
"""Train the tiny world's style LoRAs with PEFT and save them in kohya's format.

    python scripts/train_style_loras.py            # full run, writes src/loramerge/tinyworld/assets/loras
    python scripts/train_style_loras.py --smoke --out /tmp/tw --styles bold   # a few steps, for CI

Each LoRA adapts the UNet's attention (and for some also proj_in/proj_out and the feed-forward)
and the text encoder's q/k/v/out projections, on training digits drawn in its style and prompted
"a handwritten <digit>, <trigger>". It is then measured the way a user would use it: loaded with
diffusers' ``load_lora_weights`` into the shipped pipeline.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))  # run from a checkout, too

FULL = dict(steps=600, batch=32, eval_per_digit=10)  # learning rates per style: lora.SPECS
SMOKE = dict(steps=3, batch=8, eval_per_digit=1)


def main(argv=None) -> int:
    from loramerge.tinyworld import STYLES, paths

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=paths.ASSETS, help="asset folder (loras/ and report.json)")
    ap.add_argument("--pipeline", type=Path, help="base pipeline folder (default: OUT/pipeline, else the shipped one)")
    ap.add_argument("--styles", nargs="+", choices=STYLES, default=list(STYLES))
    ap.add_argument("--smoke", action="store_true", help="a few steps only, to prove the script works")
    ap.add_argument("--steps", type=int, help="override the number of steps")
    ap.add_argument("--lr", type=float, help="learning rate (default: per style, lora.SPECS)")
    ap.add_argument("--uncond-plain", type=float,
                    help="share of the empty-prompt samples drawn as plain digits (default: per style, lora.SPECS)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    from loramerge import tinyworld as tw
    from loramerge.tinyworld import evaluate, lora, training

    cfg = dict(SMOKE if args.smoke else FULL)
    if args.steps:
        cfg["steps"] = args.steps
    base_dir = args.pipeline or (paths.pipeline_dir(args.out) if paths.pipeline_dir(args.out).exists()
                                 else paths.pipeline_dir())
    log = training.Log()
    results = {}
    for style in args.styles:
        t = time.time()
        pipe = tw.load_pipeline(base_dir)
        lora.train_lora(pipe, style, cfg["steps"], seed=args.seed, batch=cfg["batch"], lr=args.lr,
                        uncond_plain=args.uncond_plain, log=log)
        path = lora.save_kohya(pipe, style, paths.lora_path(style, args.out), cfg["steps"])
        seconds = round(time.time() - t, 1)
        log(f"{style}: trained in {seconds}s -> {path}")

        # measure as a user would: a fresh base pipeline, plus the kohya file through diffusers
        pipe = tw.load_pipeline(base_dir)
        base = evaluate.style_hit_rate(pipe, style, cfg["eval_per_digit"], seed=0)
        pipe.load_lora_weights(str(path))
        with_lora = evaluate.style_hit_rate(pipe, style, cfg["eval_per_digit"], seed=0)
        results[style] = dict(
            lora.SPECS[style], trigger=tw.trigger_words()[style], steps=cfg["steps"], train_seconds=seconds,
            bytes=path.stat().st_size, hit_rate=round(with_lora["hit_rate"], 4),
            base_false_positive_rate=round(base["hit_rate"], 4),
            digit_accuracy_with_lora=round(with_lora["digit_accuracy"], 4), threads=args.threads,
        )
        log(f"{style}: hit rate {with_lora['hit_rate']:.2f} with the LoRA, {base['hit_rate']:.2f} without; "
            f"digit accuracy {with_lora['digit_accuracy']:.2f}")
    training.update_report(paths.report_path(args.out), "loras", results, merge=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
