"""Per-block weights (A1111 vectors, diffusers dicts, patterns, Flux ranges) and YAML recipes."""

import json
import subprocess
import sys
import textwrap

import pytest
import torch

import loramerge
from loramerge.blocks import block_id, parse_block_weights
from loramerge.errors import UsageError
from loramerge.recipe import RecipeError, load_recipe
from loramerge.synthetic import attention_targets, random_lora


@pytest.fixture(scope="module")
def sd1_pair(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sd1")
    targets = attention_targets("sd1")
    loramerge.save(random_lora("sd1", targets, rank=4, alpha=2, seed=1), folder / "a.safetensors")
    loramerge.save(random_lora("sd1", targets, rank=2, seed=2), folder / "b.safetensors", format="diffusers")
    return folder


LBW = [0.3, 1, 0.5, 0, 0, 1, 1, 0.2, 1, 1, 1, 0.5, 0.5, 0.5, 0, 0, 0.7]
DICT = {
    "text_encoder": 0.3,
    "unet": {
        "down": {"block_0": [1, 0.5], "block_1": [0, 0], "block_2": [1, 1]},
        "mid": 0.2,
        "up": {"block_1": [1, 1, 1], "block_2": [0.5, 0.5, 0.5], "block_3": [0, 0, 0.7]},
    },
}


def test_lbw_vector_and_diffusers_dict_give_the_same_file(sd1_pair, tmp_path):
    a, b = sd1_pair / "a.safetensors", sd1_pair / "b.safetensors"
    out = []
    for i, spec in enumerate([LBW, DICT, ",".join(map(str, LBW)), json.dumps(DICT)]):
        merged = loramerge.merge([a, b], weights=[0.7, 0.8], block_weights=[spec, None], method="svd", rank=4, device="cpu")
        loramerge.save(merged, tmp_path / f"{i}.safetensors")
        out.append((tmp_path / f"{i}.safetensors").read_bytes())
    # the resolved weights (not the spelling) go into the recipe, so all four files are identical
    assert out[0] == out[1] == out[2] == out[3]


def test_block_weights_scale_the_right_modules(sd1_pair):
    a = loramerge.load(sd1_pair / "a.safetensors")
    merged = loramerge.merge([a], weights=[1.0], block_weights=LBW, method="linear", device="cpu")
    bw = parse_block_weights(LBW, "sd1")
    checked = set()
    for module in a:
        w = bw.weight_for(module)
        got, ref = merged[module.key].delta(torch.float64), module.delta(torch.float64)
        assert torch.allclose(got, w * ref, atol=1e-6 * float(ref.abs().max())), module.key
        checked.add(w)
    assert checked == {0.0, 0.2, 0.3, 0.5, 0.7, 1.0}
    key = "unet.up_blocks.3.attentions.2.transformer_blocks.0.attn1.to_q"  # output_blocks.11 = OUT11
    assert block_id("sd1", merged[key]) == "OUT11" and bw.weight_for(merged[key]) == 0.7


def test_presets_patterns_and_flux_ranges():
    bw = parse_block_weights("OUTALL", "sd1")
    assert bw.components == {"text_encoder": 1.0} and bw.blocks["IN01"] == 0 and bw.blocks["OUT05"] == 1
    bw = parse_block_weights({"unet.up_blocks.1.*": 0.25, "text_encoder": 0}, "sd1")
    lora = random_lora("sd1", attention_targets("sd1"), rank=1)
    assert {bw.weight_for(m) for m in lora if m.name.startswith("up_blocks.1.")} == {0.25}
    assert {bw.weight_for(m) for m in lora if m.component == "text_encoder"} == {0.0}
    flux = random_lora("flux", attention_targets("flux"), rank=1)
    bw = parse_block_weights({"transformer": {"double": {"0-9": 0.5}, "single": {"20-37": 0.8}}, "text_encoder": 0}, "flux")
    for m in flux:
        expected = 1.0
        if m.component == "text_encoder":
            expected = 0.0
        elif m.name.startswith("transformer_blocks.") and int(m.name.split(".")[1]) <= 9:
            expected = 0.5
        elif m.name.startswith("single_transformer_blocks.") and int(m.name.split(".")[1]) >= 20:
            expected = 0.8
        assert bw.weight_for(m) == expected, m.key
    with pytest.raises(UsageError, match="takes 17 or 26 values, got 3"):
        parse_block_weights([1, 2, 3], "sd1")
    with pytest.raises(UsageError, match="Stable Diffusion 1.x takes 17 or 26 values, got 12"):
        parse_block_weights([1] * 12, "sd1")


# --------------------------------------------------------------------------------------------


def write(tmp_path, text, name="r.yaml"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def test_recipe_runs_and_is_embedded(sd1_pair, tmp_path):
    recipe = write(tmp_path, f"""\
        # style + subject
        sources:
          - path: {sd1_pair / 'a.safetensors'}
            weight: 0.7
            block_weights: OUTALL
          - {sd1_pair / 'b.safetensors'}:0.8
        method: svd
        rank: 4
        output:
          path: out.safetensors
          format: diffusers
          dtype: fp16
          title: my merge
        """)
    proc = subprocess.run([sys.executable, "-m", "loramerge", "merge", "--recipe", recipe], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    merged = loramerge.load(tmp_path / "out.safetensors")
    assert merged.format == "diffusers" and merged.dtype == torch.float16 and set(merged.ranks) == {4}
    assert merged.metadata["modelspec.title"] == "my merge"
    embedded = json.loads(merged.metadata["loramerge.recipe"])
    assert embedded["method"] == "svd" and embedded["rank"] == 4
    assert [s["weight"] for s in embedded["sources"]] == [0.7, 0.8]
    assert embedded["sources"][0]["block_weights"]["blocks"]["IN01"] == 0.0  # resolved; a recipe re-reads it
    assert embedded["output"] == {"format": "diffusers", "dtype": "fp16", "title": "my merge"}
    assert all(len(s["sha256"]) == 64 for s in embedded["sources"])
    # the same recipe again: byte-identical
    first = (tmp_path / "out.safetensors").read_bytes()
    subprocess.run([sys.executable, "-m", "loramerge", "merge", "--recipe", recipe], check=True, capture_output=True)
    assert (tmp_path / "out.safetensors").read_bytes() == first


def test_recipe_typo_in_method_names_the_line(sd1_pair, tmp_path):
    recipe = write(tmp_path, f"""\
        sources:
          - path: {sd1_pair / 'a.safetensors'}
        method: tiess
        output: out.safetensors
        """)
    with pytest.raises(RecipeError) as info:
        load_recipe(recipe)
    message = str(info.value)
    assert "r.yaml: line 3: method: unknown merge method 'tiess'" in message and "did you mean 'ties'" in message
    proc = subprocess.run([sys.executable, "-m", "loramerge", "merge", "--recipe", recipe], capture_output=True, text=True)
    assert proc.returncode == 2 and "line 3" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out.safetensors").exists()


def test_recipe_missing_source_and_bad_fields_name_the_line(sd1_pair, tmp_path):
    recipe = write(tmp_path, f"""\
        sources:
          - path: {sd1_pair / 'a.safetensors'}
          - path: missing.safetensors
            weight: 0.5
        method: linear
        """)
    with pytest.raises(RecipeError, match=r"line 3: sources\[1\]\.path: no such file 'missing.safetensors'"):
        load_recipe(recipe)
    recipe = write(tmp_path, f"""\
        sources: [{sd1_pair / 'a.safetensors'}]
        method: svd
        rnak: 4
        """, "b.yaml")
    with pytest.raises(RecipeError, match=r"line 3: rnak: unknown field \(did you mean 'rank'\?\)"):
        load_recipe(recipe)
    recipe = write(tmp_path, f"""\
        sources: [{sd1_pair / 'a.safetensors'}]
        method: linear
        rank: 4
        """, "c.yaml")
    with pytest.raises(RecipeError, match=r"line 3: method 'linear' does not take a rank"):
        load_recipe(recipe)


def run_cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "loramerge", *map(str, args)], capture_output=True, text=True, cwd=cwd)


def test_embedded_recipe_reruns_to_the_same_bytes(sd1_pair, tmp_path):
    out = tmp_path / "m.safetensors"
    proc = run_cli("merge", sd1_pair / "a.safetensors", f"{sd1_pair / 'b.safetensors'}:-0.4", "--method", "ties",
                   "-p", "density=0.3", "--block-weights", "OUTALL", "--dtype", "fp16", "--title", "t", "-o", out)
    assert proc.returncode == 0, proc.stderr
    proc = run_cli("inspect", "--recipe", out, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    (tmp_path / "r.yaml").write_text(proc.stdout)
    proc = run_cli("merge", "--recipe", "r.yaml", "-o", "again.safetensors", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "again.safetensors").read_bytes() == out.read_bytes()


def test_flags_with_a_recipe_are_refused_not_ignored(sd1_pair, tmp_path):
    recipe = write(tmp_path, f"""\
        sources: [{sd1_pair / 'a.safetensors'}]
        method: svd
        rank: 2
        output: out.safetensors
        """)
    for flag in (["--method", "linear"], ["--rank", "3"], ["--dtype", "fp16"], ["--seed", "1"], ["--format", "diffusers"]):
        proc = run_cli("merge", "--recipe", recipe, *flag)
        assert proc.returncode == 2 and flag[0] in proc.stderr and "--recipe" in proc.stderr, proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out.safetensors").exists()


def test_a_changed_source_is_named(sd1_pair, tmp_path):
    recipe = write(tmp_path, f"""\
        sources:
          - path: {sd1_pair / 'a.safetensors'}
            sha256: {"0" * 64}
        output: out.safetensors
        """)
    with pytest.raises(RecipeError, match=r"line 3: sources\[0\]\.sha256: a.safetensors has changed"):
        load_recipe(recipe)
