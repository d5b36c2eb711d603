"""What ``loramerge inspect`` reports about a LoRA: architecture, format, components, ranks,
alphas, per-block norms of ΔW (computed from the factors) and the provenance a merge recorded.
"""

from __future__ import annotations

import collections
import math

from . import linalg
from .formats import archs
from .lora import LoRA, LoraModule
from .errors import one_line
from .provenance import describe_embedded


def block_of(spec: archs.Architecture, module: LoraModule) -> str:
    """The group ``inspect`` reports a module under: a denoiser block, or a text encoder."""
    if module.component not in spec.denoisers:
        return module.component
    return f"{module.component}.{spec.blocks.summary_group(module.name)}"


def delta_norm(module: LoraModule) -> float:
    """‖ΔW‖_F from the factors (0 for modules whose change depends on the base weight: they
    have no ΔW of their own)."""
    if module.needs_base:
        return 0.0
    up, down = module.factors()
    return abs(module.scale) * linalg.frobenius_norm_of_product(up, down)


def summarize(lora: LoRA, norms: bool = True) -> dict:
    spec = archs.spec(lora.arch)
    components = collections.Counter(m.component for m in lora)
    blocks: dict[str, dict] = {}
    for m in lora:
        entry = blocks.setdefault(block_of(spec, m), {"modules": 0, "ranks": collections.Counter(), "norm_sq": 0.0})
        entry["modules"] += 1
        entry["ranks"][m.rank] += 1
        if norms:
            entry["norm_sq"] += delta_norm(m) ** 2
    return {
        "file": str(lora.path) if lora.path else None,
        "architecture": lora.arch,
        "architecture_label": spec.label,
        "variant": lora.variant,
        "variants": [] if lora.variant else list(getattr(lora, "variants", ())),  # the candidates, if undetermined
        "format": lora.format,
        "dtype": str(lora.dtype).replace("torch.", ""),
        "modules": len(lora),
        "components": {c: components[c] for c in lora.components},
        "kinds": dict(collections.Counter(m.kind for m in lora)),
        # what the file states (its trainer's dims and alphas); ranks of the exact ΔW factors apart
        "dims": _counts(m.file_dim if m.file_dim is not None else m.rank for m in lora),
        "alphas": _counts(_stated_alpha(m) for m in lora),
        "ranks": _counts(m.rank for m in lora),
        "conv_modules": sum(m.is_conv for m in lora),
        "blocks": {
            name: {
                "modules": b["modules"],
                "ranks": _counts(b["ranks"].elements()),
                **({"delta_norm": math.sqrt(b["norm_sq"])} if norms else {}),
            }
            for name, b in sorted(blocks.items(), key=lambda kv: _block_order(kv[0]))
        },
        "title": lora.metadata.get("modelspec.title"),
        "date": lora.metadata.get("modelspec.date"),
        "merged_from": lora.metadata.get("modelspec.merged_from"),
        "recipe": describe_embedded(lora.metadata, lora.path),
    }


def _stated_alpha(m: LoraModule):
    """The alpha the file states; where it states none, alpha = dim (scale 1) as readers do."""
    return m.file_alpha or m.file_dim or m.alpha


def _counts(values) -> dict[str, int]:
    counter = collections.Counter(values)
    return {_fmt(k): v for k, v in sorted(counter.items())}


def _fmt(x) -> str:
    return str(int(x)) if float(x).is_integer() else f"{float(x):g}"


def _block_order(name: str):
    """Denoiser first, then text encoders; blocks in their numeric order."""
    parts = name.split(".")
    numbers = [int(p) for p in parts if p.isdigit()]
    return (parts[0].startswith("text_encoder"), parts[0], [p for p in parts if not p.isdigit()][:2], numbers, name)


def format_summary(summary: dict) -> str:
    """Human-readable text of :func:`summarize`'s result."""
    lines = []
    if summary["file"]:
        lines.append(f"file          {summary['file']}")
    lines += [
        f"architecture  {summary['architecture']} ({summary['architecture_label']})",
        *_variant_line(summary),
        f"format        {summary['format']}   dtype {summary['dtype']}",
        f"modules       {summary['modules']}  ("
        + ", ".join(f"{c}: {n}" for c, n in summary["components"].items())
        + ")",
        "kinds         " + ", ".join(f"{k}: {n}" for k, n in summary["kinds"].items()),
        "dims          " + _dist(summary["dims"]),
        "alphas        " + _dist(summary["alphas"]),
    ]
    if summary["ranks"] != summary["dims"]:
        lines.append("ΔW ranks      " + _dist(summary["ranks"]) + "  (of the exact factors of each module's ΔW)")
    if summary["conv_modules"]:
        lines.append(f"conv modules  {summary['conv_modules']}")
    if summary.get("clients"):
        lines.append("clients       " + ", ".join(
            f"{name} {'✓' if c['exact'] else '✗ (' + c['summary'] + ')'}" for name, c in summary["clients"].items()))
    for key in ("title", "date", "merged_from"):
        if summary.get(key):
            lines.append(f"{key:<13} {summary[key]}")
    if summary.get("recipe") and "invalid" in summary["recipe"]:
        lines.append(f"recipe        (unreadable: {summary['recipe']['invalid']})")
    elif summary.get("recipe"):
        r = summary["recipe"]
        params = ", ".join(f"{k}={v}" for k, v in (r.get("params") or {}).items())
        extra = [f"rank={r['rank']}" if r.get("rank") else "", f"energy={r['energy']}" if r.get("energy") else ""]
        lines.append("recipe        " + " ".join(x for x in [r.get("method", "?"), params, *extra] if x))
        for s in r.get("sources", []):
            sha = s.get("sha256", "")[:12]
            lines.append(f"  source      {s.get('path', '?')} × {s.get('weight')}  sha256 {sha}…")
    has_norms = any("delta_norm" in b for b in summary["blocks"].values())
    lines.append("")
    lines.append(f"{'block':<40} {'modules':>7}  {'ranks':<14}" + ("  ‖ΔW‖_F" if has_norms else ""))
    for name, b in summary["blocks"].items():
        norm = f"  {b['delta_norm']:.4g}" if has_norms else ""
        lines.append(f"{name:<40} {b['modules']:>7}  {_dist(b['ranks']):<14}{norm}")
    return "\n".join(map(one_line, lines))  # names and titles from the file, each on its line, literally


def _variant_line(summary: dict) -> list[str]:
    """For architectures with several variants: the file's, or why it is not known."""
    variants = summary.get("variants") or []
    if len(variants) < 2:
        return []
    found = summary["variant"] or f"undetermined (several of {', '.join(variants)} fit its keys and shapes; its header names none)"
    return [f"variant       {found}"]


def _dist(counts: dict[str, int]) -> str:
    if len(counts) == 1:
        return next(iter(counts))
    return ", ".join(f"{k}×{v}" for k, v in counts.items())
