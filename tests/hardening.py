"""Helpers of the hardening tests and the fuzz suite: LoRA files written by hand (raw headers
included), the CLI run in-process or in a subprocess, and the invariant every run must keep:
exit 0 with a readable, finite, re-readable output, or exit 2 with one line and nothing written
(no partial file, no temp file), inputs never modified."""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

Q = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
K = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_k"
PEFT_Q = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"


def kohya(path, rank=4, width=320, seed=0, dtype=torch.float32, extra=None, metadata=None, keys=(Q, K)):
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for key in keys:
        sd[f"{key}.lora_up.weight"] = (torch.randn(width, rank, generator=g) * 0.1).to(dtype)
        sd[f"{key}.lora_down.weight"] = (torch.randn(rank, width, generator=g) * 0.1).to(dtype)
        sd[f"{key}.alpha"] = torch.tensor(float(rank) / 2)
    sd.update(extra or {})
    save_file(sd, str(path), metadata={"ss_base_model_version": "sd_v1", **(metadata or {})})
    return Path(path)


def peft(path, metadata=None, rank=4, width=320):
    g = torch.Generator().manual_seed(1)
    sd = {f"{PEFT_Q}.lora_A.weight": torch.randn(rank, width, generator=g),
          f"{PEFT_Q}.lora_B.weight": torch.randn(width, rank, generator=g)}
    save_file(sd, str(path), metadata={"ss_base_model_version": "sd_v1", **(metadata or {})})
    return Path(path)


def raw_safetensors(path, header: bytes | str, data: bytes = b"") -> Path:
    """A file with exactly this header text (no validation, no padding)."""
    if isinstance(header, str):
        header = header.encode("utf-8")
    Path(path).write_bytes(struct.pack("<Q", len(header)) + header + data)
    return Path(path)


def header_of(entries: dict, metadata: dict | None = None) -> str:
    """A header for ``entries`` ({name: (dtype, shape)}) laid out back to back."""
    header, offset = {}, 0
    if metadata is not None:
        header["__metadata__"] = metadata
    sizes = {"F32": 4, "F16": 2, "BF16": 2, "I32": 4, "I64": 8, "BOOL": 1, "U8": 1, "F8_E4M3": 1, "F8_E5M2": 1,
             "F64": 8, "I16": 2, "I8": 1}
    for name, (dtype, shape) in entries.items():
        n = sizes.get(dtype, 4) * math.prod(shape)
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    return json.dumps(header), offset


def snapshot(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` (hashes), to show what a run wrote or changed."""
    out = {}
    for p in sorted(folder.rglob("*")):
        if p.is_symlink():
            out[str(p.relative_to(folder))] = "link:" + os.readlink(p)
        elif p.is_file():
            out[str(p.relative_to(folder))] = hashlib.sha256(p.read_bytes()).hexdigest()
        elif not p.is_dir():
            out[str(p.relative_to(folder))] = "special"
    return out


def cli(capsys, *args, env=None):
    """The ``loramerge`` command in this process: (exit code, stdout, stderr)."""
    from loramerge import cli as cli_module

    saved_argv, saved_env = sys.argv, dict(os.environ)
    sys.argv = ["loramerge", *map(str, args)]
    os.environ.update(env or {})
    capsys.readouterr()
    try:
        cli_module.main()
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    finally:
        sys.argv = saved_argv
        os.environ.clear()
        os.environ.update(saved_env)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def subprocess_cli(*args, env=None, cwd=None, timeout=300):
    full_env = {**os.environ, **(env or {})}
    proc = subprocess.run([sys.executable, "-m", "loramerge", *map(str, args)], capture_output=True, text=True,
                          env=full_env, cwd=cwd, timeout=timeout)
    return proc.returncode, proc.stdout, proc.stderr


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.strip() and not line.startswith("warning: ")]


def assert_one_line(code, stderr, *needles, exit_code=2):
    lines = error_lines(stderr)
    assert code == exit_code, stderr
    assert len(lines) == 1, stderr
    assert lines[0].startswith(("error: ", "internal error: ")), lines[0]
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def temps(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.name.endswith(".tmp")]


def check_lora_output(path: Path) -> None:
    """A written LoRA: readable by the official reader and by loramerge, finite."""
    from safetensors.torch import load_file

    import loramerge

    tensors = load_file(str(path))
    assert tensors, path
    for name, t in tensors.items():
        assert bool(torch.isfinite(t.float()).all()), name
    again = loramerge.load(path)
    for module in again:
        up, down = module.factors()
        assert bool(torch.isfinite(up).all() and torch.isfinite(down).all())
