#!/usr/bin/env python
"""Fit the tiny world's detectors: the digit classifier and one threshold per style score.

    python scripts/train_detectors.py            # full run, writes src/loramerge/tinyworld/assets/detectors
    python scripts/train_detectors.py --smoke --out /tmp/tw   # a few steps, for CI

The classifier (a small CNN) learns digits under every style. Each style score's threshold comes
from the training split; its ROC AUC and error rates are measured on the held-out split.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))  # run from a checkout, too

FULL_STEPS, SMOKE_STEPS = 1200, 5


def main(argv=None) -> int:
    from loramerge.tinyworld import paths

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=paths.ASSETS, help="asset folder (detectors/ and report.json)")
    ap.add_argument("--smoke", action="store_true", help="a few steps only, to prove the script works")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    import torch
    from safetensors.torch import save_file

    torch.set_num_threads(args.threads)
    from loramerge.tinyworld import data, training

    log = training.Log()
    start = time.time()
    styles = training.fit_detectors()
    for style, entry in styles.items():
        log(f"{style:8s} score {entry['score']:13s} threshold {entry['threshold']:.4f} "
            f"held-out AUC {entry['held_out_auc']:.4f}")
    steps = SMOKE_STEPS if args.smoke else FULL_STEPS
    net = training.train_classifier(steps, seed=args.seed, log=log)
    accuracy = training.classifier_accuracy(net)
    log(f"classifier held-out accuracy {accuracy}")

    out = paths.detectors_json(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(paths.classifier_path(args.out)),
              metadata={"format": "pt", "architecture": "loramerge.tinyworld.detectors.DigitNet"})
    spec = {
        "canvas": data.CANVAS,
        "note": "score > threshold means the style is present; thresholds from the training split, "
                "AUC and rates on held-out digits (plain vs styled)",
        "styles": styles,
    }
    out.write_text(json.dumps(spec, indent=2) + "\n")
    result = {
        "classifier_steps": steps,
        "classifier_held_out_accuracy": accuracy,
        "styles": styles,
        "seconds": round(time.time() - start, 1),
        "threads": args.threads,
    }
    training.update_report(paths.report_path(args.out), "detectors", result)
    log(f"wrote {out} and {paths.classifier_path(args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
