"""``loramerge tune``: search merge weights, per-block weights and method parameters against an
objective, with CMA-ES (the ``cmaes`` package) or an optuna sampler, serially or on Ray.

In the spirit of mergekit-evolve (Akiba et al. 2024, "Evolutionary Optimization of Model
Merging Recipes"): a candidate is a recipe, it is applied to a loaded pipeline (merged and
patched in, or composed at inference time), the pipeline generates, and the objective scores
the images. Candidates are asked in generations of ``popsize`` and told back only when the
whole generation is scored, in ask order — so a seed gives the same trials whether they are
evaluated one after the other or by Ray actors that finish in any order.

Objectives (``--objective``): ``tinyworld`` (the digit world's composition score on the given
digits: digit accuracy × the smaller style retention), ``clip:DIR`` (mean cosine of a local
CLIP model's text and image embeddings over ``--prompts``), or ``module:function`` (called as
``function(pipe, **context)`` with the candidate applied; returns a number or a dict with a
``score``). Higher is better.

The journal (one JSON line per trial, appended and flushed) makes a run resumable: a rerun
with the same settings replays the journal's trials into the optimiser and evaluates only what
is missing. Outputs (written atomically): ``best.yaml`` (a normal recipe, see
:mod:`loramerge.recipe`), ``trials.csv``, ``trials.md`` and ``tune.png``.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import importlib
import io
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from .outputs import write_bytes, write_text
from .errors import LoraMergeError, UsageError

SAMPLERS = ("cmaes", "tpe", "random")


class TuneError(LoraMergeError):
    """A tuning run that cannot go on (a journal from other settings, a failing objective…)."""


# ------------------------------------------------------------------------------------ settings


@dataclass
class TuneConfig:
    sources: list[str]
    objective: str = "tinyworld"
    method: str = "linear"  # a merge method, or compose:<switch|composite|klora|mix>
    space: tuple[str, ...] = ("weights",)  # weights, blocks, params, guidance
    budget: int = 24
    popsize: int = 6
    sampler: str = "cmaes"
    seed: int = 0
    base: str | None = None
    prompts: list[str] = field(default_factory=list)
    digits: tuple[int, ...] = (0, 1, 2, 3, 4)
    samples: int = 4  # per digit (tinyworld) or per prompt
    steps: int | None = None  # denoising steps (default: the objective's)
    weight_range: tuple[float, float] = (0.0, 2.0)
    block_range: tuple[float, float] = (0.0, 1.5)
    guidance_range: tuple[float, float] = (1.0, 8.0)
    compose_params: dict = field(default_factory=dict)  # fixed compose settings (prompts="own"…)
    method_params: dict = field(default_factory=dict)  # fixed merge-method parameters

    def fingerprint(self) -> str:
        data = dataclasses.asdict(self)
        data.pop("budget")  # a resumed run may ask for more trials
        return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]

    @property
    def composes(self) -> bool:
        return self.method.startswith("compose:")


@dataclass
class Dimension:
    name: str
    low: float
    high: float
    integer: bool = False

    def clip(self, value: float) -> float:
        value = min(max(float(value), self.low), self.high)
        return float(round(value)) if self.integer else value


def _groups(lora) -> list[str]:
    """The coarse blocks a LoRA's modules fall into: unet down/mid/up, transformer double/single,
    and each text encoder."""
    from .formats import archs

    spec = archs.spec(lora.arch)
    found = []
    for m in lora:
        if m.component in spec.text_encoders:
            group = m.component
        elif m.component == "unet":
            head = m.name.split(".")[0]
            group = {"down_blocks": "down", "mid_block": "mid", "up_blocks": "up"}.get(head)
        else:
            head = m.name.split(".")[0]
            group = {"transformer_blocks": "double", "single_transformer_blocks": "single"}.get(head)
        if group and group not in found:
            found.append(group)
    order = ["down", "mid", "up", "double", "single"]
    return sorted(found, key=lambda g: (order.index(g) if g in order else len(order), g))


def block_spec(lora, values: dict[str, float]) -> dict:
    """Coarse group weights → a block-weights dict the recipe schema reads."""
    spec: dict[str, Any] = {}
    unet = {k: values[k] for k in ("down", "mid", "up") if k in values}
    if unet:
        spec["unet"] = unet
    dit = {k: values[k] for k in ("double", "single") if k in values}
    if dit:
        spec["transformer"] = dit
    for k, v in values.items():
        if k.startswith("text_encoder"):
            spec[k] = v
    return spec


def search_space(config: TuneConfig, loras) -> list[Dimension]:
    from .methods import get_method

    dims = []
    known = {"weights", "blocks", "params", "guidance"}
    unknown = sorted(set(config.space) - known)
    if unknown:
        raise UsageError(f"--space takes {', '.join(sorted(known))}; got {unknown[0]!r}")
    if "weights" in config.space:
        dims += [Dimension(f"weight:{i}", *config.weight_range) for i in range(len(loras))]
    if "blocks" in config.space:
        for i, lora in enumerate(loras):
            dims += [Dimension(f"block:{i}:{g}", *config.block_range) for g in _groups(lora)]
    if "params" in config.space:
        if config.composes:
            kind = config.method.split(":", 1)[1]
            if kind == "switch":
                dims.append(Dimension("compose:tau", 1, 4, integer=True))
            if kind == "klora":
                dims += [Dimension("compose:alpha", 0.5, 3.0), Dimension("compose:beta", 0.0, 2.0)]
        else:
            for p in get_method(config.method).params:
                if p.kind is float and p.low is not None and p.high is not None and p.name not in config.method_params:
                    dims.append(Dimension(f"param:{p.name}", p.low, p.high))
    if "guidance" in config.space:
        dims.append(Dimension("guidance", *config.guidance_range))
    if not dims:
        raise UsageError("nothing to tune: the search space is empty for this method")
    return dims


def candidate_from(x, dims: list[Dimension], config: TuneConfig, loras) -> dict:
    """A point of the search space as a candidate recipe (JSON-able)."""
    values = {d.name: d.clip(v) for d, v in zip(dims, x)}
    weights = [values.get(f"weight:{i}", 1.0) for i in range(len(loras))]
    blocks = []
    for i, lora in enumerate(loras):
        group = {g: values[f"block:{i}:{g}"] for g in _groups(lora) if f"block:{i}:{g}" in values}
        blocks.append(block_spec(lora, group) if group else None)
    candidate = {"weights": weights, "block_weights": blocks, "values": values}
    if config.composes:
        params = dict(config.compose_params)
        params.update({k.split(":", 1)[1]: (int(v) if k == "compose:tau" else v)
                       for k, v in values.items() if k.startswith("compose:")})
        candidate["compose"] = {"method": config.method.split(":", 1)[1], **params}
    else:
        candidate["method"] = config.method
        candidate["params"] = {**config.method_params,
                               **{k.split(":", 1)[1]: v for k, v in values.items() if k.startswith("param:")}}
    if "guidance" in values:
        candidate["guidance_scale"] = values["guidance"]
    return candidate


# ------------------------------------------------------------------------------------ objectives


def _generate_kwargs(context: dict, default_steps: int | None) -> dict:
    out = {}
    if context.get("guidance_scale") is not None:
        out["guidance_scale"] = context["guidance_scale"]
    if default_steps:
        out["num_inference_steps"] = default_steps
    return out


class TinyWorldObjective:
    """Composition score of the digit world on some digits (styles from the LoRAs' triggers)."""

    def __init__(self, styles: list[str], digits, samples: int, seed: int, steps: int | None):
        self.styles, self.digits, self.samples, self.seed, self.steps = styles, list(digits), samples, seed, steps
        self.alone: dict[str, float] | None = None

    def prompts(self, styles):
        from . import tinyworld as tw

        digits = np.repeat(np.asarray(self.digits), self.samples)
        return [tw.prompt(d, list(styles)) for d in digits], digits

    def images(self, pipe, styles, context):
        from . import tinyworld as tw

        prompts, digits = self.prompts(styles)
        kwargs = {"guidance": context["guidance_scale"]} if context.get("guidance_scale") else {}
        if self.steps:
            kwargs["steps"] = self.steps
        return tw.generate(pipe, prompts, seed=self.seed, **kwargs), digits

    def calibrate(self, pipe, loras) -> None:
        """Each LoRA alone with its own trigger: the retention denominators."""
        from .tinyworld import composition as comp

        self.alone = {}
        for style, lora in zip(self.styles, loras):
            with comp.with_mix(pipe, {style: lora}, {style: 1.0}):
                images, digits = self.images(pipe, [style], {})
            self.alone[style] = comp.score_images(style, images, digits, [style]).hits[style]

    def __call__(self, pipe, **context) -> dict:
        from .tinyworld import composition as comp

        images, digits = self.images(pipe, self.styles, context)
        score = comp.score_images("trial", images, digits, self.styles, self.alone)
        out = {"score": score.composition, "accuracy": score.accuracy}
        out.update({f"retention_{s}": v for s, v in score.retention.items()})
        return out


class ClipObjective:
    """Mean cosine similarity of CLIP text and image embeddings (a local CLIP model folder)."""

    def __init__(self, folder: str, prompts: list[str], samples: int, seed: int, steps: int | None):
        from transformers import CLIPModel, CLIPTokenizer

        if not prompts:
            raise UsageError("--objective clip:DIR needs --prompts")
        try:
            self.model = CLIPModel.from_pretrained(folder, local_files_only=True).eval()
            self.tokenizer = CLIPTokenizer.from_pretrained(folder, local_files_only=True)
        except (OSError, ValueError) as exc:
            raise UsageError(f"cannot load a CLIP model from {folder}: {str(exc).splitlines()[0]}") from None
        config = self._preprocessor(folder)
        self.mean = torch.tensor(config.get("image_mean", [0.4815, 0.4578, 0.4082])).view(1, 3, 1, 1)
        self.std = torch.tensor(config.get("image_std", [0.2686, 0.2613, 0.2758])).view(1, 3, 1, 1)
        self.size = self.model.config.vision_config.image_size
        self.prompts, self.samples, self.seed, self.steps = prompts, samples, seed, steps

    @staticmethod
    def _preprocessor(folder: str) -> dict:
        path = Path(folder) / "preprocessor_config.json"
        return json.loads(path.read_text()) if path.is_file() else {}

    @torch.no_grad()
    def score_images(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """Per image: cosine of its embedding with its prompt's. ``images``: (N, C, H, W) in [0, 1]."""
        if images.shape[1] == 1:
            images = images.expand(-1, 3, -1, -1)
        pixels = torch.nn.functional.interpolate(images.float(), size=(self.size, self.size), mode="bicubic",
                                                 align_corners=False)
        pixels = (pixels - self.mean) / self.std
        tokens = self.tokenizer(prompts, padding=True, truncation=True, return_tensors="pt")
        image = self.model.get_image_features(pixel_values=pixels)
        text = self.model.get_text_features(**tokens)
        image = image.pooler_output if hasattr(image, "pooler_output") else image
        text = text.pooler_output if hasattr(text, "pooler_output") else text
        return torch.nn.functional.cosine_similarity(image, text, dim=-1)

    def __call__(self, pipe, **context) -> dict:
        prompts = [p for p in self.prompts for _ in range(self.samples)]
        kwargs = _generate_kwargs(context, self.steps)
        with torch.no_grad():
            images = pipe(prompts, generator=torch.Generator().manual_seed(self.seed), output_type="pt", **kwargs).images
        return {"score": float(self.score_images(images, prompts).mean())}


def user_objective(spec: str) -> Callable:
    module, sep, name = spec.partition(":")
    if not sep or not module or not name:
        raise UsageError(f"--objective {spec!r}: expected tinyworld, clip:DIR or module:function")
    try:
        fn = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as exc:
        raise UsageError(f"--objective {spec!r}: cannot import it ({exc})") from None
    if not callable(fn):
        raise UsageError(f"--objective {spec!r} is not callable")
    return fn


def _trigger_styles(loras) -> list[str]:
    from .tinyworld.data import TRIGGERS

    by_trigger = {v: k for k, v in TRIGGERS.items()}
    styles = []
    for lora in loras:
        phrase = lora.metadata.get("modelspec.trigger_phrase")
        if phrase not in by_trigger:
            raise UsageError(f"{lora.path}: the tinyworld objective needs a tiny-world style LoRA "
                             f"(trigger phrase {phrase!r} is none of {', '.join(TRIGGERS.values())})")
        styles.append(by_trigger[phrase])
    return styles


# ------------------------------------------------------------------------------------ evaluation


class Evaluator:
    """A pipeline kept loaded, the LoRAs, the objective: scores candidates one at a time."""

    def __init__(self, config: TuneConfig):
        from .io import load

        torch.set_num_threads(int(os.environ.get("LORAMERGE_THREADS", "1")))
        self.config = config
        self.loras = [load(p) for p in config.sources]
        self.names = [f"lora{i}" for i in range(len(self.loras))]
        kind = config.objective
        if kind == "tinyworld":
            from . import tinyworld as tw

            self.pipe = tw.load_pipeline(config.base) if config.base else tw.load_pipeline()
            self.objective = TinyWorldObjective(_trigger_styles(self.loras), config.digits, config.samples,
                                                config.seed, config.steps)
            self.objective.calibrate(self.pipe, self.loras)
        else:
            if not config.base:
                raise UsageError(f"--objective {kind} needs --base PIPE_FOLDER")
            from .methods.learned import load_base

            self.pipe = load_base(config.base)
            if kind.startswith("clip:"):
                self.objective = ClipObjective(kind[5:], config.prompts, config.samples, config.seed, config.steps)
            else:
                self.objective = user_objective(kind)

    def evaluate(self, candidate: dict) -> dict:
        from .composer import compose
        from .merge import merge
        from .runtime import attach

        context = {"guidance_scale": candidate.get("guidance_scale"), "seed": self.config.seed}
        if "compose" in candidate:
            settings = dict(candidate["compose"])
            method = settings.pop("method")
            blocks = {n: b for n, b in zip(self.names, candidate["block_weights"]) if b is not None}
            with compose(self.pipe, dict(zip(self.names, self.loras)), method=method,
                         weights=dict(zip(self.names, candidate["weights"])), block_weights=blocks or None, **settings):
                result = self.objective(self.pipe, **context)
        else:
            blocks = candidate["block_weights"] if any(b is not None for b in candidate["block_weights"]) else None
            merged = merge(self.loras, candidate["weights"], method=candidate["method"], seed=self.config.seed,
                           device="cpu", block_weights=blocks, **candidate["params"])
            mix = attach(self.pipe, {"merged": merged})
            try:
                mix.fuse()
                result = self.objective(self.pipe, **context)
            finally:
                mix.detach()
        if not isinstance(result, dict):
            result = {"score": float(result)}
        if "score" not in result or not math.isfinite(float(result["score"])):
            raise TuneError(f"the objective returned no finite score: {result!r}")
        return {k: float(v) for k, v in result.items()}


class SerialRunner:
    def __init__(self, config: TuneConfig):
        self.evaluator = Evaluator(config)

    def map(self, candidates: list[dict]) -> list[dict]:
        return [self.evaluator.evaluate(c) for c in candidates]

    def close(self) -> None:
        pass


class RayRunner:
    """Ray actors, each keeping a pipeline loaded (one per CPU slot, or per GPU when there are
    GPUs); results come back in ask order whatever order they finish in."""

    def __init__(self, config: TuneConfig, address: str | None = None, workers: int | None = None):
        import ray

        self.started = False
        if not ray.is_initialized():
            if address:
                ray.init(address=address, include_dashboard=False, log_to_driver=False)
            else:
                ray.init(num_cpus=workers or None, include_dashboard=False, log_to_driver=False)
            self.started = True
        resources = ray.cluster_resources()
        gpus = int(resources.get("GPU", 0))
        count = workers or (gpus if gpus else max(1, int(resources.get("CPU", 1))))
        actor = ray.remote(num_gpus=1 if gpus else 0, num_cpus=0 if gpus else 1)(Evaluator)
        self.actors = [actor.remote(config) for _ in range(count)]
        self.ray = ray

    def map(self, candidates: list[dict]) -> list[dict]:
        from ray.util import ActorPool

        pool = ActorPool(self.actors)
        return list(pool.map(lambda a, c: a.evaluate.remote(c), candidates))

    def close(self) -> None:
        for a in self.actors:
            self.ray.kill(a)
        if self.started:
            self.ray.shutdown()


# ------------------------------------------------------------------------------------ optimisers


class Optimiser:
    """Ask/tell in generations of ``popsize``: CMA-ES or an optuna sampler, seeded."""

    def __init__(self, dims: list[Dimension], sampler: str, popsize: int, seed: int):
        if sampler not in SAMPLERS:
            raise UsageError(f"--sampler takes {', '.join(SAMPLERS)}; got {sampler!r}")
        self.dims, self.sampler, self.popsize = dims, sampler, popsize
        if sampler == "cmaes":
            from cmaes import CMA

            lows = np.array([d.low for d in dims], dtype=float)
            highs = np.array([d.high for d in dims], dtype=float)
            mean = np.array([min(max(1.0, d.low), d.high) if d.name.startswith(("weight", "block")) else (d.low + d.high) / 2
                             for d in dims])
            sigma = float(np.mean(highs - lows)) / 4
            self.cma = CMA(mean=mean, sigma=sigma, bounds=np.stack([lows, highs], 1), seed=seed,
                           population_size=max(2, popsize))
            self.popsize = self.cma.population_size
        else:
            import optuna

            optuna.logging.set_verbosity(optuna.logging.WARNING)
            made = (optuna.samplers.TPESampler(seed=seed, n_startup_trials=popsize) if sampler == "tpe"
                    else optuna.samplers.RandomSampler(seed=seed))
            self.study = optuna.create_study(direction="maximize", sampler=made)
        self._pending: list = []

    def ask(self) -> list[np.ndarray]:
        if self.sampler == "cmaes":
            self._pending = [self.cma.ask() for _ in range(self.popsize)]
            return list(self._pending)
        import optuna

        self._pending = [self.study.ask() for _ in range(self.popsize)]
        out = []
        for trial in self._pending:
            out.append(np.array([trial.suggest_int(d.name, int(d.low), int(d.high)) if d.integer
                                 else trial.suggest_float(d.name, d.low, d.high) for d in self.dims], dtype=float))
        return out

    def tell(self, scores: list[float]) -> None:
        if self.sampler == "cmaes":
            self.cma.tell([(x, -s) for x, s in zip(self._pending, scores)])  # CMA minimises
        else:
            for trial, s in zip(self._pending, scores):
                self.study.tell(trial, s)
        self._pending = []


# ------------------------------------------------------------------------------------ the run


@dataclass
class TuneResult:
    trials: list[dict]
    best: dict
    outputs: list[Path]


def _journal_lines(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            break  # a line cut by a crash ends the usable journal
    return rows


def tune(config: TuneConfig, out_dir: Path, journal: Path | None = None, ray: bool = False,
         ray_address: str | None = None, workers: int | None = None, progress=None) -> TuneResult:
    """Run (or resume) a search; returns every trial and the best one, and writes the outputs."""
    from .io import load

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    journal = Path(journal) if journal else out_dir / "journal.jsonl"
    loras = [load(p) for p in config.sources]
    if len(loras) < 2:
        raise UsageError("tune needs at least two LoRA files")
    dims = search_space(config, loras)
    fingerprint = config.fingerprint()
    previous = _journal_lines(journal)
    if previous and previous[0].get("fingerprint") != fingerprint:
        raise TuneError(f"{journal} was written by a run with other settings; give another --journal or --out")
    done = [row for row in previous[1:] if "result" in row]
    optimiser = Optimiser(dims, config.sampler, config.popsize, config.seed)
    runner = None
    trials: list[dict] = []
    with open(journal, "a") as log:
        if not previous:
            _append(log, {"fingerprint": fingerprint, "config": dataclasses.asdict(config)})
        try:
            while len(trials) < config.budget:
                xs = optimiser.ask()
                candidates = [candidate_from(x, dims, config, loras) for x in xs]
                results: list[dict | None] = []
                for i, c in enumerate(candidates):
                    n = len(trials) + i
                    if n < len(done):
                        if not np.allclose(done[n]["x"], [float(v) for v in xs[i]], rtol=1e-9, atol=1e-12):
                            raise TuneError(f"{journal}: trial {n} does not replay (another seed or version?)")
                        results.append(done[n]["result"])
                    else:
                        results.append(None)
                missing = [i for i, r in enumerate(results) if r is None]
                if missing:
                    if runner is None:
                        runner = (RayRunner(config, ray_address, workers) if (ray or ray_address)
                                  else SerialRunner(config))
                    scored = runner.map([candidates[i] for i in missing])
                    for i, r in zip(missing, scored):
                        results[i] = r
                generation = len(trials) // optimiser.popsize
                for i, (x, c, r) in enumerate(zip(xs, candidates, results)):
                    row = {"trial": len(trials), "generation": generation, "x": [float(v) for v in x],
                           "candidate": c, "result": r}
                    trials.append(row)
                    if row["trial"] >= len(done):
                        _append(log, row)
                    if progress:
                        progress(len(trials), config.budget, r["score"])
                optimiser.tell([r["score"] for r in results])
        finally:
            if runner is not None:
                runner.close()
    trials = trials[:config.budget]
    best = max(trials, key=lambda t: (t["result"]["score"], -t["trial"]))
    outputs = write_outputs(config, loras, trials, best, out_dir)
    return TuneResult(trials, best, outputs)


def _append(handle, row: dict) -> None:
    handle.write(json.dumps(row, sort_keys=True) + "\n")
    handle.flush()
    os.fsync(handle.fileno())


# ------------------------------------------------------------------------------------ outputs


def recipe_dict(config: TuneConfig, candidate: dict, output: str | None = None) -> dict:
    """A candidate as a recipe in the schema of loramerge.recipe."""
    sources = []
    for path, weight, blocks in zip(config.sources, candidate["weights"], candidate["block_weights"]):
        entry: dict[str, Any] = {"path": str(Path(path).resolve()), "weight": round(weight, 6)}
        if blocks is not None:
            entry["block_weights"] = json.loads(json.dumps(blocks), parse_float=lambda s: round(float(s), 6))
        sources.append(entry)
    recipe: dict[str, Any] = {"sources": sources}
    if "compose" in candidate:
        compose = {k: (round(v, 6) if isinstance(v, float) else v) for k, v in candidate["compose"].items()}
        if candidate.get("guidance_scale") is not None:
            compose["guidance_scale"] = round(candidate["guidance_scale"], 6)
        recipe["compose"] = compose
    else:
        recipe["method"] = candidate["method"]
        params = {k: (round(v, 6) if isinstance(v, float) else v) for k, v in candidate["params"].items()}
        if params:
            recipe["params"] = params
        recipe["seed"] = config.seed
    if output:
        recipe["output"] = {"path": output}
    return recipe


def write_outputs(config: TuneConfig, loras, trials: list[dict], best: dict, out_dir: Path) -> list[Path]:
    import yaml

    recipe = recipe_dict(config, best["candidate"], None if config.composes else "tuned.safetensors")
    header = (f"# loramerge tune: best of {len(trials)} trials (trial {best['trial']}), "
              f"score {best['result']['score']:.4f} on objective {config.objective}\n")
    paths = [write_text(out_dir / "best.yaml", header + yaml.safe_dump(recipe, sort_keys=False))]
    names = [d for d in trials[0]["candidate"]["values"]]
    metrics = sorted({k for t in trials for k in t["result"]})
    metrics = ["score"] + [m for m in metrics if m != "score"]
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["trial", "generation", *metrics, *names])
    for t in trials:
        writer.writerow([t["trial"], t["generation"], *[f"{t['result'].get(m, float('nan')):.6g}" for m in metrics],
                         *[f"{t['candidate']['values'][n]:.6g}" for n in names]])
    paths.append(write_text(out_dir / "trials.csv", buffer.getvalue()))
    lines = [f"# loramerge tune ({config.sampler}, {len(trials)} trials, objective {config.objective})", "",
             "| trial | " + " | ".join(metrics + names) + " |", "|---:|" + "---:|" * (len(metrics) + len(names))]
    for t in trials:
        mark = " **best**" if t is best else ""
        lines.append(f"| {t['trial']}{mark} | " + " | ".join(f"{t['result'].get(m, float('nan')):.3f}" for m in metrics)
                     + " | " + " | ".join(f"{t['candidate']['values'][n]:.3f}" for n in names) + " |")
    paths.append(write_text(out_dir / "trials.md", "\n".join(lines) + "\n"))
    paths.append(_plot(trials, out_dir / "tune.png"))
    return paths


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats on both coordinates (higher is better)."""
    front = []
    for i, (a, b) in enumerate(points):
        if not any((c >= a and d >= b) and (c > a or d > b) for j, (c, d) in enumerate(points) if j != i):
            front.append(i)
    return sorted(front, key=lambda i: points[i])


def _plot(trials: list[dict], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    retentions = sorted({k for t in trials for k in t["result"] if k.startswith("retention_")})
    fig, axes = plt.subplots(1, 2 if len(retentions) >= 2 else 1, figsize=(10 if len(retentions) >= 2 else 5, 4))
    axes = np.atleast_1d(axes)
    scores = [t["result"]["score"] for t in trials]
    axes[0].plot(range(len(scores)), scores, "o", ms=4, color="#4a7ab8", label="trial")
    axes[0].plot(range(len(scores)), np.maximum.accumulate(scores), "-", color="#c0392b", label="best so far")
    axes[0].set_xlabel("trial")
    axes[0].set_ylabel("score")
    axes[0].legend()
    if len(retentions) >= 2:
        a, b = retentions[:2]
        points = [(t["result"][a], t["result"][b]) for t in trials]
        front = pareto_front(points)
        axes[1].plot(*zip(*points), "o", ms=4, color="#999999", label="trials")
        axes[1].plot(*zip(*[points[i] for i in front]), "-o", ms=5, color="#c0392b", label="Pareto front")
        axes[1].set_xlabel(a.replace("_", " "))
        axes[1].set_ylabel(b.replace("_", " "))
        axes[1].legend()
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    return write_bytes(path, buffer.getvalue())
