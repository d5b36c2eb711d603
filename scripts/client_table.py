"""Which format loads where: `check` run on files loramerge writes, for every architecture, format
and client (the README's table is made from this output).

Each file holds a rank-1 LoRA on every module of the architecture's full-size key table — the
denoiser and the CLIP encoders; with --t5 the T5 encoders too — written in each output format.

    python scripts/client_table.py [--t5] [--arch sdxl] [--json]
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import warnings
from pathlib import Path

import torch

from loramerge import LoRA, LoraModule, clients
from loramerge.errors import ClientWarning, LoraMergeError
from loramerge.formats import archs, keymaps
from loramerge.formats.write import save_lora


def full_lora(arch: archs.Architecture, t5: bool) -> LoRA:
    variant = next(iter(arch.variants))
    modules = []
    for component, names in keymaps.table(variant).items():
        config = arch.variants[variant][component]
        if config["_class_name"].startswith("T5") and not t5:
            continue
        for i, (name, shape) in enumerate(sorted(names.items())):
            if len(shape) < 2:  # norm weights: not LoRA targets
                continue
            up, down = torch.full((shape[0], 1), 1e-3), torch.full((1, math.prod(shape[1:])), 1e-3)
            modules.append(LoraModule.from_factors(component, name, up, down, tuple(shape), alpha=1.0 + i % 3))
    lora = LoRA(modules, arch.name)
    lora.variant = variant
    return lora


def table(names: list[str], t5: bool) -> list[dict]:
    rows = []
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore", ClientWarning)
        for name in names:
            arch = archs.spec(name)
            lora = full_lora(arch, t5)
            for fmt in arch.formats:
                path = Path(tmp) / f"{name}-{fmt}.safetensors"
                try:
                    save_lora(lora, path, format=fmt, dtype=torch.float16)
                except LoraMergeError as exc:  # a format that cannot hold some module
                    rows.append({"arch": name, "format": fmt, "default": fmt == arch.default_format,
                                 "clients": {c: f"not written: {exc}" for c in clients.CLIENTS}})
                    continue
                report = clients.check(path, arch=name)
                rows.append({"arch": name, "format": fmt, "default": fmt == arch.default_format,
                             "clients": {v.client: ("✓" if v.exact else v.summary()) for v in report.verdicts}})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--t5", action="store_true", help="also put LoRA modules on the T5 encoders")
    parser.add_argument("--arch", action="append", help="only these architectures")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = table(args.arch or archs.names(), args.t5)
    if args.json:
        print(json.dumps(rows, indent=2, ensure_ascii=False))
        return
    print("| architecture | format | " + " | ".join(clients.CLIENTS) + " |")
    print("|---|---|" + "---|" * len(clients.CLIENTS))
    for row in rows:
        fmt = row["format"] + (" (default)" if row["default"] else "")
        print(f"| {row['arch']} | {fmt} | " + " | ".join(row["clients"][c] for c in clients.CLIENTS) + " |")


if __name__ == "__main__":
    main()
