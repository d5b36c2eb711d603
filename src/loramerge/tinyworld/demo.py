"""``loramerge demo``: two bundled style LoRAs of the tiny digit world merged with several
methods, fused into a copy of the pipeline and live-mixed; every variant scored and shown in
``loramerge-demo/index.html``.
"""

from __future__ import annotations

import html
import io
import shutil
import time
from pathlib import Path

import numpy as np

from .. import tinyworld as tw
from ..outputs import write_bytes, write_text
from ..fuse import fuse
from ..io import save
from . import composition as comp

METHODS = ("linear", "svd", "ties", "dare_ties", "knots", "tsv", "iso_c")
# inference-time compositions shown beside the merges: (label, method, parameters, guidance, note)
COMPOSED = (
    ("compose: composite, own prompts, guidance x2", "composite", {"prompts": "own"}, 2 * tw.DEFAULT_GUIDANCE,
     "each LoRA's pass sees only its own trigger word; guidance directions summed (composable diffusion)"),
    ("compose: switch, own prompts, guidance x2", "switch", {"prompts": "own", "tau": 1}, 2 * tw.DEFAULT_GUIDANCE,
     "LoRA Switch, the LoRAs alternating every step"),
    ("compose: k-lora", "klora", {}, tw.DEFAULT_GUIDANCE, "K-LoRA: per layer and step, the LoRA with the larger top-k |ΔW|"),
    ("compose: composite", "composite", {}, tw.DEFAULT_GUIDANCE, "LoRA Composite: per-LoRA predictions averaged"),
)


def save_png(images: np.ndarray, path: Path, scale: int = 3) -> None:
    """A (rows·10, H, W) or (N, H, W) grey batch as one PNG: 10 digits per row, white background."""
    from PIL import Image

    n, h, w = images.shape
    cols = 10
    rows = (n + cols - 1) // cols
    canvas = np.ones((rows * (h + 2), cols * (w + 2)), dtype=np.float32)
    for i, image in enumerate(images):
        r, c = divmod(i, cols)
        canvas[r * (h + 2) + 1: r * (h + 2) + 1 + h, c * (w + 2) + 1: c * (w + 2) + 1 + w] = 1.0 - image
    picture = Image.fromarray((canvas.clip(0, 1) * 255).astype(np.uint8), mode="L")
    buffer = io.BytesIO()
    picture.resize((picture.width * scale, picture.height * scale), Image.NEAREST).save(buffer, format="PNG")
    write_bytes(path, buffer.getvalue())


def _by_digit(images, per_digit: int) -> np.ndarray:
    """Reorder (digit-major) samples so each PNG row shows digits 0-9."""
    x = images[:, 0].numpy()
    h, w = x.shape[1:]
    return x.reshape(10, per_digit, h, w).transpose(1, 0, 2, 3).reshape(-1, h, w)


def run_demo(out_dir: Path = Path("loramerge-demo"), styles=("bold", "slanted"), per_digit: int = 3,
             seed: int = 0, log=print) -> Path:
    start = time.perf_counter()
    out_dir.mkdir(parents=True, exist_ok=True)
    pipe = tw.load_pipeline()
    loras = comp.load_styles(styles)
    rows: list[tuple[comp.Score, str, str]] = []  # (score, picture, note)

    def record(score, images, slug, note=""):
        picture = f"{slug}.png"
        save_png(_by_digit(images, per_digit), out_dir / picture)
        rows.append((score, picture, note))
        log(f"  {score.label:<34} digits {score.accuracy:.2f}  " +
            "  ".join(f"{s} {v:.2f}" for s, v in score.hits.items()))

    score, images = comp.measure(pipe, "base, no LoRA", styles, per_digit, seed)
    record(score, images, "base", "prompted with both trigger words")
    alone = comp.alone_rates(pipe, loras, per_digit, seed)
    for style, (score, images) in alone.items():
        record(score, images, f"alone_{style}", f"{style} LoRA, prompted with its trigger word")
    denominators = {s: alone[s][0].hits[s] for s in styles}
    a, b = (loras[s] for s in styles)
    reduced = max(max(m.rank for m in a), max(m.rank for m in b)) // 2
    for method in METHODS:
        merged = comp.merged_for(method, [a, b], [1.0, 1.0], reduced_rank=reduced)
        save(merged, out_dir / f"merged_{method}.safetensors")
        with comp.with_mix(pipe, {"merged": merged}, {"merged": 1.0}):
            score, images = comp.measure(pipe, f"merge: {method}", styles, per_digit, seed, denominators)
        note = f"rank {reduced}" if method == "svd" else ""
        record(score, images, f"merge_{method}", note)
    with comp.with_mix(pipe, loras, {s: 1.0 for s in styles}):
        score, images = comp.measure(pipe, "live mix, weights 1 + 1", styles, per_digit, seed, denominators)
    record(score, images, "live_mix", "both LoRAs attached, patched in place")
    from ..composer import compose

    for i, (label, method, params, guidance, note) in enumerate(COMPOSED):
        with compose(pipe, loras, method=method, **params):
            score, images = comp.measure(pipe, label, styles, per_digit, seed, denominators, guidance=guidance)
        record(score, images, f"compose_{i}_{method}", note)

    fused_dir = out_dir / "fused_pipeline"
    shutil.rmtree(fused_dir, ignore_errors=True)
    fuse(tw.paths.pipeline_dir(), [tw.lora_paths()[s] for s in styles], fused_dir, weights=[1.0, 1.0])
    fused = tw.load_pipeline(fused_dir)
    score, images = comp.measure(fused, "fused into a pipeline copy", styles, per_digit, seed, denominators)
    record(score, images, "fused", "loramerge fuse → from_pretrained")

    page = out_dir / "index.html"
    write_text(page, _html(rows, styles, per_digit, time.perf_counter() - start))
    return page


def _number(value) -> str:
    """Two decimals, or "–" where the value does not apply (absent or not a number)."""
    return "–" if value is None or value != value else f"{value:.2f}"


def _html(rows, styles, per_digit: int, seconds: float) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in
                   ["mix", "digit accuracy", *[f"{s} hits" for s in styles], *[f"{s} retention" for s in styles],
                    "composition", "samples (rows: seeds, columns: digits 0-9)"])
    body = []
    for score, picture, note in rows:
        cells = [f"<b>{html.escape(score.label)}</b><br><small>{html.escape(note)}</small>",
                 f"{score.accuracy:.2f}"]
        cells += [_number(score.hits.get(s)) for s in styles]
        cells += [_number(score.retention.get(s)) if score.retention else "–" for s in styles]
        cells.append(_number(score.composition) if score.retention else "–")
        cells.append(f'<img src="{html.escape(picture)}" alt="{html.escape(score.label)}">')
        body.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>loramerge demo</title>
<style>body{{font-family:sans-serif;margin:2em}} table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:6px;vertical-align:middle}} img{{image-rendering:pixelated}}</style></head>
<body><h1>loramerge demo: {html.escape(' + '.join(styles))}</h1>
<p>The tiny digit world shipped with loramerge: a diffusers Stable Diffusion pipeline trained on
scikit-learn's digits and style LoRAs trained on transformed digits. Each row generates
{per_digit} sample(s) of every digit with both trigger words in the prompt. Retention is a style's
hit rate relative to that LoRA alone; composition = digit accuracy × the smaller retention.
Made in {seconds:.0f} s.</p>
<table><tr>{head}</tr>
{chr(10).join(body)}
</table></body></html>
"""
