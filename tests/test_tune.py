"""loramerge tune: deterministic for a seed, the same trials serially and on Ray, resumable from
its journal, a normal recipe out, and the CLIP objective against CLIP's own logits."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

import loramerge
import tune_helpers
from loramerge import tinyworld as tw
from loramerge.errors import UsageError
from loramerge.recipe import load_recipe
from loramerge.tune import ClipObjective, TuneConfig, TuneError, pareto_front, tune

LORAS = [str(tw.lora_paths()[s]) for s in ("bold", "slanted")]
BASE = str(tw.paths.pipeline_dir())


def tiny_config(**kw):
    base = dict(sources=LORAS, objective="tinyworld", budget=4, popsize=2, digits=(0, 1), samples=1, steps=4)
    base.update(kw)
    return TuneConfig(**base)


def table(result):
    return [(t["trial"], [round(v, 12) for v in t["x"]], t["result"]) for t in result.trials]


def test_serial_and_ray_give_the_same_trials(tmp_path, monkeypatch):
    import ray

    config = tiny_config(method="compose:composite", space=("weights", "guidance"), compose_params={"prompts": "own"})
    serial = tune(config, tmp_path / "serial")
    # the machine is shared: Ray's memory monitor would kill these small workers for what other
    # processes use
    monkeypatch.setenv("RAY_memory_monitor_refresh_ms", "0")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        on_ray = tune(config, tmp_path / "ray", ray=True)
    finally:
        ray.shutdown()
    assert table(serial) == table(on_ray)
    assert (tmp_path / "serial" / "best.yaml").read_bytes() == (tmp_path / "ray" / "best.yaml").read_bytes()
    assert len({t["result"]["score"] for t in serial.trials}) > 1 or len({tuple(t["x"]) for t in serial.trials}) == 4
    recipe = load_recipe(tmp_path / "serial" / "best.yaml")
    assert recipe.compose["method"] == "composite" and recipe.compose["prompts"] == "own"
    assert [s.weight for s in recipe.sources] == pytest.approx(serial.best["candidate"]["weights"], abs=1e-6)


def test_resume_replays_the_journal_and_evaluates_only_new_trials(tmp_path):
    config = TuneConfig(sources=LORAS, objective="tune_helpers:unet_response", base=BASE, space=("weights", "blocks"),
                        budget=4, popsize=2, seed=3)
    tune_helpers.CALLS.clear()
    first = tune(config, tmp_path / "a")
    assert len(tune_helpers.CALLS) == 4
    config.budget = 8
    resumed = tune(config, tmp_path / "a")
    assert len(tune_helpers.CALLS) == 8  # four more, not eight
    fresh = tune(config, tmp_path / "b")
    assert table(resumed) == table(fresh)  # a resumed run is the run it would have been
    assert table(first) == table(fresh)[:4]
    lines = (tmp_path / "a" / "journal.jsonl").read_text().splitlines()
    assert len(lines) == 9 and "fingerprint" in json.loads(lines[0])
    # the best static recipe is a normal recipe: loramerge merge --recipe runs it
    recipe = yaml.safe_load((tmp_path / "a" / "best.yaml").read_text())
    assert recipe["method"] == "linear" and "block_weights" in recipe["sources"][0]
    plan = load_recipe(tmp_path / "a" / "best.yaml")
    merged = loramerge.merge([s.path for s in plan.sources], device="cpu", **{k: v for k, v in plan.merge_kwargs().items() if k != "device"})
    assert len(merged) > 0
    best = max(resumed.trials, key=lambda t: t["result"]["score"])
    assert best["trial"] == resumed.best["trial"]
    assert (tmp_path / "a" / "tune.png").read_bytes()[:4] == b"\x89PNG"
    csv_rows = (tmp_path / "a" / "trials.csv").read_text().splitlines()
    assert len(csv_rows) == 9


def test_journal_from_other_settings_is_refused(tmp_path):
    config = TuneConfig(sources=LORAS, objective="tune_helpers:unet_response", base=BASE, budget=2, popsize=2)
    tune(config, tmp_path)
    config.seed = 1
    with pytest.raises(TuneError):
        tune(config, tmp_path)


def test_clip_objective_matches_clip_logits(tmp_path):
    from transformers import CLIPConfig, CLIPModel, CLIPTokenizer

    torch.manual_seed(0)
    config = CLIPConfig(text_config=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                                         vocab_size=1000, max_position_embeddings=77, bos_token_id=0, eos_token_id=2,
                                         pad_token_id=1),
                        vision_config=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                                           num_attention_heads=4, image_size=32, patch_size=8),
                        projection_dim=16)
    folder = tmp_path / "clip"
    model = CLIPModel(config).eval()
    model.save_pretrained(folder)
    CLIPTokenizer.from_pretrained(str(Path(BASE) / "tokenizer")).save_pretrained(folder)
    objective = ClipObjective(str(folder), ["a handwritten seven, bold"], samples=2, seed=0, steps=3)
    images = torch.rand(2, 1, 32, 32, generator=torch.Generator().manual_seed(1))
    prompts = ["a handwritten seven, bold", "a handwritten two"]
    ours = objective.score_images(images, prompts)
    pixels = (images.expand(-1, 3, -1, -1) - objective.mean) / objective.std  # 32 px already: no resize
    tokens = objective.tokenizer(prompts, padding=True, return_tensors="pt")
    with torch.no_grad():
        logits = model(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask, pixel_values=pixels).logits_per_image
    cosines = torch.diagonal(logits) / model.logit_scale.exp()
    torch.testing.assert_close(ours, cosines, rtol=1e-4, atol=1e-5)
    result = tune(TuneConfig(sources=LORAS, objective=f"clip:{folder}", base=BASE, prompts=["a handwritten seven, bold"],
                             budget=2, popsize=2, samples=1, steps=3), tmp_path / "run")
    assert all(-1.0 <= t["result"]["score"] <= 1.0 for t in result.trials)


def test_pareto_front_against_brute_force():
    points = [(0.1, 0.9), (0.5, 0.5), (0.4, 0.4), (0.9, 0.1), (0.5, 0.6), (0.2, 0.2)]
    front = pareto_front(points)
    dominated = {i for i, p in enumerate(points) for q in points if q != p and q[0] >= p[0] and q[1] >= p[1]}
    assert set(front) == set(range(len(points))) - dominated == {0, 3, 4}


def test_bad_settings_are_one_line_errors(tmp_path):
    for kw in (dict(sampler="annealing"), dict(space=("colours",)), dict(objective="no_such_module:f", base=BASE)):
        with pytest.raises(UsageError) as info:
            tune(tiny_config(**kw), tmp_path / "x")
        assert "\n" not in str(info.value)
    proc = subprocess.run([sys.executable, "-m", "loramerge", "tune", *LORAS, "--digits", "3-12", "--out", str(tmp_path)],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0


def test_compose_recipes_run_with_compose_recipe_and_not_with_merge(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({
        "sources": [{"path": LORAS[0], "weight": 1.2}, {"path": LORAS[1], "weight": 0.8}],
        "compose": {"method": "switch", "tau": 2, "guidance_scale": 4.0}}))
    proc = subprocess.run([sys.executable, "-m", "loramerge", "merge", "--recipe", str(recipe), "-o", str(tmp_path / "m.safetensors")],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "compose" in proc.stderr and proc.stderr.strip().count("\n") == 0
    pipe = tw.load_pipeline()
    handle, generation = loramerge.compose_recipe(pipe, recipe)
    assert generation == {"guidance_scale": 4.0}
    assert handle.method == "switch" and handle.tau == 2 and handle.weights == [1.2, 0.8]
    handle.remove()
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"sources": [LORAS[0]], "compose": {"method": "blend"}}))
    with pytest.raises(loramerge.LoraMergeError, match="line"):
        load_recipe(bad)
