"""How an architecture's denoiser divides into blocks, for per-block weights and reports.

Two grammars:
- :class:`UnetBlocks`: SD-style UNets, blocks named as A1111's LoRA Block Weight extension
  names them — BASE (text encoders), INxx / M00 / OUTxx after the sgm block numbers;
- :class:`TransformerBlocks`: DiTs, blocks ``kind.i`` for each block container
  (``double.3`` = ``transformer_blocks.3`` in Flux, ``block.7`` = ``blocks.7`` in Wan…).
Modules outside every block (embedders, final layers) have no block id.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .schemes.sgm import diffusers_to_sgm

_IN = [f"IN{i:02d}" for i in range(12)]
_OUT = [f"OUT{i:02d}" for i in range(12)]


@dataclass(frozen=True)
class UnetBlocks:
    up_blocks_with_attention: tuple[int, ...]
    down_blocks: int  # how many down blocks (diffusers dict keys block_0 … block_{n-1})
    # A1111 LoRA Block Weight vectors this UNet takes: length → block ids in order
    vectors: dict[int, tuple[str, ...]] = field(default_factory=dict)
    kind = "unet"

    def block_of(self, name: str) -> str | None:
        parts = diffusers_to_sgm(name, self.up_blocks_with_attention).split(".")
        if parts[0] == "input_blocks":
            return f"IN{int(parts[1]):02d}"
        if parts[0] == "middle_block":
            return "M00"
        if parts[0] == "output_blocks":
            return f"OUT{int(parts[1]):02d}"
        return None

    def summary_group(self, name: str) -> str:
        """The coarser group ``inspect`` reports norms for: down_blocks.i, mid_block, up_blocks.i."""
        parts = name.split(".")
        if parts[0] in ("down_blocks", "up_blocks") and len(parts) > 1:
            return f"{parts[0]}.{parts[1]}"
        return parts[0]


SD_VECTORS = {
    17: ("BASE", "IN01", "IN02", "IN04", "IN05", "IN07", "IN08", "M00", *_OUT[3:]),
    26: ("BASE", *_IN, "M00", *_OUT),
}
SDXL_VECTORS = {
    12: ("BASE", "IN04", "IN05", "IN07", "IN08", "M00", *_OUT[:6]),
    20: ("BASE", *_IN[:9], "M00", *_OUT[:9]),
}


@dataclass(frozen=True)
class TransformerBlocks:
    # user-facing block kind → the container holding those blocks, e.g. {"double": "transformer_blocks"}
    kinds: dict[str, str]
    aliases: dict[str, str] = field(default_factory=dict)  # other names users give a kind
    kind = "transformer"

    def block_of(self, name: str) -> str | None:
        for kind, container in self.kinds.items():
            prefix = container + "."
            if name.startswith(prefix):
                index = name[len(prefix):].split(".", 1)[0]
                if index.isdigit():
                    return f"{kind}.{int(index)}"
        return None

    def summary_group(self, name: str) -> str:
        block = self.block_of(name)
        if block is None:
            return "other"
        kind, index = block.split(".")
        return f"{self.kinds[kind]}.{index}"

    def resolve_kind(self, key: str) -> str | None:
        return key if key in self.kinds else self.aliases.get(key)
