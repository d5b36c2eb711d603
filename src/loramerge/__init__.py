"""loramerge: read, merge, convert, fuse and live-mix LoRA adapters of diffusion models, on ΔW.

    import loramerge
    a = loramerge.load("style.safetensors")
    merged = loramerge.merge([a, "subject.safetensors"], weights=[0.7, 0.8], method="svd", rank=32)
    loramerge.save(merged, "merged.safetensors")    # the format every client loads
"""

from .version import __version__  # noqa: E402

from .errors import LoraMergeError  # noqa: E402
from .lora import LoRA, LoraModule  # noqa: E402
from .io import load, save  # noqa: E402
from .merge import merge  # noqa: E402
from .methods import METHODS  # noqa: E402
from .runtime import LiveMix, attach  # noqa: E402
from .composer import Composition, compose  # noqa: E402
from .recipe import compose_recipe  # noqa: E402

__all__ = ["load", "save", "merge", "attach", "LiveMix", "compose", "compose_recipe", "Composition", "LoRA", "LoraModule",
           "LoraMergeError", "METHODS", "__version__"]
