#!/usr/bin/env python
"""Train the tiny world's Stable Diffusion pipeline from scratch on scikit-learn's digits.

    python scripts/train_tinyworld.py            # full run, writes src/loramerge/tinyworld/assets/pipeline
    python scripts/train_tinyworld.py --smoke --out /tmp/tw   # a few steps, for CI

The VAE learns plain and styled digits; then the CLIP text encoder and the UNet learn
"a handwritten <digit>" on plain digits. The saved folder loads with
StableDiffusionPipeline.from_pretrained(folder). Needs the detectors (scripts/train_detectors.py)
only for the accuracy it reports at the end.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))  # run from a checkout, too

FULL = dict(vae_steps=400, unet_steps=1400, unet_batch=128, vae_batch=64, eval_per_digit=10)
SMOKE = dict(vae_steps=3, unet_steps=3, unet_batch=8, vae_batch=8, eval_per_digit=1)


def main(argv=None) -> int:
    from loramerge.tinyworld import paths

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=paths.ASSETS, help="asset folder (pipeline/ and report.json)")
    ap.add_argument("--smoke", action="store_true", help="a few steps only, to prove the script works")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--unet-steps", type=int, help="override the number of UNet steps")
    ap.add_argument("--vae-from", type=Path, help="reuse the VAE of this pipeline folder (development)")
    ap.add_argument("--eval-only", action="store_true", help="measure the saved pipeline again, no training")
    args = ap.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    from loramerge.tinyworld import build, training, vocab

    cfg = dict(SMOKE if args.smoke else FULL)
    if args.unet_steps:
        cfg["unet_steps"] = args.unet_steps
    log = training.Log()
    if args.eval_only:
        import json

        known = json.loads(paths.report_path(args.out).read_text())["pipeline"]
        return measure(paths.pipeline_dir(args.out), args, cfg, known, log)
    start = time.time()
    timings = {}
    with tempfile.TemporaryDirectory() as work:
        vae = None
        if args.vae_from:
            from diffusers import AutoencoderKL

            vae = AutoencoderKL.from_pretrained(str(args.vae_from / "vae"), local_files_only=True)
        pipe = build.make_pipeline(work, seed=args.seed, vae=vae)
        if not args.vae_from:
            t = time.time()
            training.train_vae(pipe.vae, cfg["vae_steps"], seed=args.seed, batch=cfg["vae_batch"], log=log)
            timings["vae_s"] = round(time.time() - t, 1)
            # like SD's 0.18215: scale latents of the training digits to unit variance
            images, _ = training.D.load_split("train")
            std = training.encode(pipe.vae, images).std().item()
            pipe.vae.register_to_config(scaling_factor=round(1.0 / std, 5))
        t = time.time()
        training.train_base(pipe, cfg["unet_steps"], seed=args.seed, batch=cfg["unet_batch"], log=log)
        timings["unet_text_encoder_s"] = round(time.time() - t, 1)
        out_dir = paths.pipeline_dir(args.out)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        pipe.save_pretrained(str(out_dir), safe_serialization=True)
        # also keep CLIP's classic vocab.json + merges.txt next to tokenizer.json
        vocab.write_tokenizer_files(out_dir / "tokenizer")
    timings["total_s"] = round(time.time() - start, 1)
    log(f"saved {out_dir} ({timings})")
    return measure(out_dir, args, cfg, {"timings": timings, "threads": args.threads}, log)


def measure(out_dir: Path, args, cfg: dict, result: dict, log) -> int:
    """Reload the pipeline from disk, as a user would, and record its numbers in report.json."""
    from loramerge import tinyworld as tw
    from loramerge.tinyworld import evaluate, paths, training

    pipe = tw.load_pipeline(out_dir)
    result = dict(result, config=cfg, seed=args.seed, generate_steps=tw.DEFAULT_STEPS,
                  generate_guidance=tw.DEFAULT_GUIDANCE)
    if paths.classifier_path(args.out).exists() or paths.classifier_path().exists():
        clf = paths.classifier_path(args.out) if paths.classifier_path(args.out).exists() else None
        t = time.time()
        acc = evaluate.digit_accuracy(pipe, cfg["eval_per_digit"], seed=0, classifier_path=clf)
        result["generated_digit_accuracy"] = round(acc["accuracy"], 4)
        result["generated_per_digit"] = evaluate.rounded(acc["per_digit"])
        result["eval_generate_s"] = round(time.time() - t, 1)
        log(f"generated-digit accuracy {acc['accuracy']:.3f} per digit {acc['per_digit']}")
    size = sum(f.stat().st_size for f in out_dir.rglob("*") if f.is_file())
    result["pipeline_bytes"] = size
    training.update_report(paths.report_path(args.out), "pipeline", result)
    log(f"pipeline folder {size / 1e6:.2f} MB; report {paths.report_path(args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
