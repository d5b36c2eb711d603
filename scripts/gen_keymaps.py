"""Regenerate src/loramerge/formats/keymaps/<variant>.json.gz from configs.json.

Builds each component on the meta device (no weights, no download) and records every Linear
and Conv2d module's name and weight shape. Components a variant does not list in configs.json
are taken from its base architecture (sd3.5-* share sd3's text encoders).
Run: python scripts/gen_keymaps.py
"""

import gzip
import json
from pathlib import Path

from loramerge.formats import keymaps

OUT = Path(keymaps.__file__).parent


def components_of(variant: str) -> dict:
    cfg = dict(keymaps.configs()[keymaps.VARIANT_ARCH[variant]])
    cfg.update(keymaps.configs()[variant])
    return cfg


def main() -> None:
    for variant in keymaps.VARIANTS:
        data = {}
        for component, config in components_of(variant).items():
            data[component] = keymaps.module_shapes(keymaps.build_model(config))
        raw = json.dumps(data, sort_keys=True, separators=(",", ":")).encode()
        (OUT / f"{variant}.json.gz").write_bytes(gzip.compress(raw, mtime=0))
        print(variant, {c: len(m) for c, m in data.items()}, f"{len(raw) // 1024} KiB raw")


if __name__ == "__main__":
    main()
