"""The command line: happy paths, and every kind of bad input giving one line that names the
file and the problem, exit code 2, and no output file."""

import json
import math
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

Q = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
K = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_k"


def run(*args, cwd=None):
    proc = subprocess.run([sys.executable, "-m", "loramerge", *map(str, args)], capture_output=True, text=True, cwd=cwd)
    return proc.returncode, proc.stdout, proc.stderr


def kohya(path, rank=4, width=320, seed=0, dtype=torch.float32, extra=None, version="sd_v1"):
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for key in (Q, K):
        sd[f"{key}.lora_up.weight"] = torch.randn(width, rank, generator=g).to(dtype)
        sd[f"{key}.lora_down.weight"] = torch.randn(rank, width, generator=g).to(dtype)
        sd[f"{key}.alpha"] = torch.tensor(float(rank) / 2)
    sd.update(extra or {})
    save_file(sd, str(path), metadata={"ss_base_model_version": version} if version else None)
    return path


def assert_refused(tmp_path, code, stderr, *needles):
    assert code == 2, stderr
    lines = [line for line in stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    assert not (tmp_path / "out.safetensors").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_merge_inspect_convert(tmp_path):
    a = kohya(tmp_path / "a.safetensors", rank=4, seed=1, dtype=torch.float16)
    b = kohya(tmp_path / "b.safetensors", rank=2, seed=2, dtype=torch.float16)
    code, _, err = run("merge", f"{a}:0.7", f"{b}:-0.3", "--method", "svd", "--rank", "3", "-o", tmp_path / "m.safetensors")
    assert code == 0, err
    code, out, err = run("inspect", tmp_path / "m.safetensors", "--json")
    assert code == 0, err
    summary = json.loads(out)
    assert summary["architecture"] == "sd1" and summary["modules"] == 2 and summary["ranks"] == {"3": 2}
    assert summary["dtype"] == "float16"
    assert summary["recipe"]["method"] == "svd" and [s["weight"] for s in summary["recipe"]["sources"]] == [0.7, -0.3]
    assert all(len(s["sha256"]) == 64 for s in summary["recipe"]["sources"])
    code, out, _ = run("inspect", tmp_path / "m.safetensors")
    assert code == 0 and "sd1" in out and "unet.down_blocks.0" in out
    code, _, err = run("convert", a, "--format", "diffusers", "--dtype", "fp32", "-o", tmp_path / "d.safetensors")
    assert code == 0, err
    code, out, _ = run("inspect", tmp_path / "d.safetensors", "--json")
    assert json.loads(out)["format"] == "diffusers" and json.loads(out)["dtype"] == "float32"


def test_same_inputs_give_identical_bytes(tmp_path):
    a = kohya(tmp_path / "a.safetensors", seed=1)
    b = kohya(tmp_path / "b.safetensors", seed=2)
    for name in ("m1", "m2"):
        code, _, err = run("merge", f"{a}:0.5", f"{b}:0.5", "--method", "svd", "--rank", "2", "-o", tmp_path / f"{name}.safetensors")
        assert code == 0, err
    assert (tmp_path / "m1.safetensors").read_bytes() == (tmp_path / "m2.safetensors").read_bytes()


def test_not_a_lora(tmp_path):
    save_file({"model.diffusion_model.conv_in.weight": torch.zeros(4, 4)}, str(tmp_path / "model.safetensors"))
    code, _, err = run("merge", tmp_path / "model.safetensors", "-o", tmp_path / "out.safetensors")
    assert_refused(tmp_path, code, err, "model.safetensors", "not a LoRA")


def test_truncated_file(tmp_path):
    a = kohya(tmp_path / "a.safetensors")
    data = a.read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    code, _, err = run("merge", a, tmp_path / "cut.safetensors", "-o", tmp_path / "out.safetensors")
    assert_refused(tmp_path, code, err, "cut.safetensors", "truncated")
    (tmp_path / "tiny.safetensors").write_bytes(b"\x01\x02")
    code, _, err = run("inspect", tmp_path / "tiny.safetensors")
    assert_refused(tmp_path, code, err, "tiny.safetensors", "not a safetensors file")


def test_different_architectures(tmp_path):
    a = kohya(tmp_path / "a.safetensors")
    n = "transformer.single_transformer_blocks.0.attn.to_q"
    # one single-block module fits HunyuanVideo's names and widths too: the header says Flux
    save_file({f"{n}.lora_A.weight": torch.zeros(2, 3072), f"{n}.lora_B.weight": torch.zeros(3072, 2)},
              str(tmp_path / "flux.safetensors"), metadata={"ss_base_model_version": "flux1"})
    code, _, err = run("merge", a, tmp_path / "flux.safetensors", "-o", tmp_path / "out.safetensors")
    assert_refused(tmp_path, code, err, "flux.safetensors", "flux", "sd1")


def test_mismatched_shapes(tmp_path):
    a = kohya(tmp_path / "a.safetensors", width=320)
    b = kohya(tmp_path / "b.safetensors", width=160)  # smaller than SD1 (a small model), unlike a
    code, _, err = run("merge", a, b, "-o", tmp_path / "out.safetensors")
    assert_refused(tmp_path, code, err, "b.safetensors", "a.safetensors", "has shape", "attn1.to_")


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_nan_and_inf(tmp_path, bad):
    a = kohya(tmp_path / "a.safetensors")
    b = kohya(tmp_path / "b.safetensors", seed=3)
    sd = {**__import__("safetensors.torch").torch.load_file(str(b))}
    sd[f"{K}.lora_up.weight"][3, 1] = bad
    save_file(sd, str(b))
    code, _, err = run("merge", a, b, "-o", tmp_path / "out.safetensors")
    assert_refused(tmp_path, code, err, "b.safetensors", "NaN or Inf", "attn1.to_k")


def test_output_equal_to_an_input(tmp_path):
    a = kohya(tmp_path / "a.safetensors")
    before = a.read_bytes()
    code, _, err = run("merge", f"{a}:0.5", "-o", a)
    assert code == 2 and "would overwrite the input" in err and len(err.strip().splitlines()) == 1
    assert a.read_bytes() == before
    code, _, err = run("convert", a, "-o", a)
    assert code == 2 and a.read_bytes() == before


def test_unusable_output_location_and_bad_options(tmp_path):
    a = kohya(tmp_path / "a.safetensors")
    code, _, err = run("merge", a, "-o", tmp_path / "no" / "such" / "dir.safetensors")
    assert code == 2 and "does not exist" in err
    code, _, err = run("merge", a, "--method", "tiess", "-o", tmp_path / "out.safetensors")
    assert_refused(tmp_path, code, err, "unknown merge method 'tiess'")
    code, _, err = run("merge", a, "--method", "svd", "--rank", "2", "--energy", "0.9", "-o", tmp_path / "out.safetensors")
    assert_refused(tmp_path, code, err, "--rank or --energy")
    code, _, err = run("merge", tmp_path / "missing.safetensors", "-o", tmp_path / "out.safetensors")
    assert_refused(tmp_path, code, err, "missing.safetensors", "no such file")
