"""Regenerate src/loramerge/formats/keymaps/<variant>.json.gz from the architectures' configs.

Builds each component of every variant (src/loramerge/formats/archs/*.py) on the meta device
(no weights, no download) and records every Linear/Conv module's name and weight shape, and
every norm layer's 1-D weight (where LyCORIS norm-weight deltas land).
Run: python scripts/gen_keymaps.py [variant …]
"""

import gzip
import json
import sys
from pathlib import Path

from loramerge.formats import keymaps

OUT = Path(keymaps.__file__).parent


def main(only: list[str]) -> None:
    for variant, components in keymaps.configs().items():
        if only and variant not in only:
            continue
        data = {c: keymaps.module_shapes(keymaps.build_model(config)) for c, config in components.items()}
        raw = json.dumps(data, sort_keys=True, separators=(",", ":")).encode()
        (OUT / f"{variant}.json.gz").write_bytes(gzip.compress(raw, mtime=0))
        print(variant, {c: len(m) for c, m in data.items()}, f"{len(raw) // 1024} KiB raw")


if __name__ == "__main__":
    main(sys.argv[1:])
