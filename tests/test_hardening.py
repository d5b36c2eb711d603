"""Issue #11, "no traceback, no Inf, no surprise": every input a user can give is either read
correctly or refused with one plain line (exit code 2) before any arithmetic and with nothing
written; outputs are regular files written atomically. The CLI runs in-process (fast) here;
test_fuzz.py samples the subprocess."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import save_file

import loramerge
import loramerge.tinyworld
from hardening import (K, PEFT_Q, Q, assert_one_line, cli, header_of, kohya, peft, raw_safetensors, snapshot,
                       temps)
from loramerge.errors import LoraMergeError

def refused(capsys, tmp_path, *args, needles=(), env=None, out="out.safetensors"):
    """Run the CLI; it must exit 2 with one line and leave the folder as it was."""
    before = snapshot(tmp_path)
    code, _, err = cli(capsys, *args, env=env)
    line = assert_one_line(code, err, *needles)
    assert snapshot(tmp_path) == before, "a refused run changed files"
    assert not temps(tmp_path)
    return line


def merge_refused(capsys, tmp_path, lora, *needles, extra=()):
    return refused(capsys, tmp_path, "merge", lora, *extra, "-o", tmp_path / "out.safetensors", needles=needles)


# ------------------------------------------------------------------------------------------------
# 1. the reader: tensors checked against the header and the architecture before any arithmetic


@pytest.mark.parametrize("dtype,name", [(torch.int32, "int32"), (torch.bool, "bool"), (torch.int64, "int64")])
def test_non_float_factors_are_refused_naming_the_tensor(capsys, tmp_path, dtype, name):
    path = tmp_path / "a.safetensors"
    save_file({f"{Q}.lora_up.weight": torch.ones(320, 4).to(dtype), f"{Q}.lora_down.weight": torch.ones(4, 320)},
              str(path), metadata={"ss_base_model_version": "sd_v1"})
    merge_refused(capsys, tmp_path, path, f"{Q}.lora_up.weight", name, "floating point")


def test_f8_factors_are_read_as_float(tmp_path):
    path = tmp_path / "f8.safetensors"
    g = torch.Generator().manual_seed(0)
    up, down = torch.randn(320, 4, generator=g) * 0.1, torch.randn(4, 320, generator=g) * 0.1
    save_file({f"{Q}.lora_up.weight": up.to(torch.float8_e4m3fn), f"{Q}.lora_down.weight": down.to(torch.float8_e5m2),
               f"{Q}.alpha": torch.tensor(4.0)}, str(path), metadata={"ss_base_model_version": "sd_v1"})
    lora = loramerge.load(path)
    assert lora.dtype == torch.float16  # fp16 holds every F8 value exactly
    module = next(iter(lora))
    expected = up.to(torch.float8_e4m3fn).float() @ down.to(torch.float8_e5m2).float()
    assert torch.equal(module.delta(), expected)
    loramerge.save(lora, tmp_path / "out.safetensors")
    again = loramerge.load(tmp_path / "out.safetensors")
    assert torch.allclose(next(iter(again)).delta(), expected, rtol=1e-3, atol=1e-6)


@pytest.mark.parametrize("tensors,needles", [
    ({"lora_up.weight": (320,), "lora_down.weight": (320,)}, ["1-D"]),
    ({"lora_up.weight": (320, 0), "lora_down.weight": (0, 320)}, ["empty", "rank 0"]),
    ({"lora_up.weight": (320, 4), "lora_down.weight": (4, 320), "alpha": (0,)}, ["alpha", "one number"]),
    ({"lora_up.weight": (320, 4, 1, 1), "lora_mid.weight": (3, 4, 3, 3), "lora_down.weight": (4, 320, 1, 1)},
     ["ranks of up and mid"]),
    ({"lora_up.weight": (320, 4), "lora_down.weight": (4, 320), "hada_w1_a": (320, 2)}, ["mixes"]),
    ({"hada_w1_a": (320, 2), "hada_w1_b": (2, 320), "hada_w2_a": (640, 2), "hada_w2_b": (2, 320)},
     ["hada_w1_a and hada_w2_a"]),
    ({"lokr_w1": (4, 4), "lokr_w1_a": (4, 2), "lokr_w2": (80, 80)}, ["operand 1 twice"]),
    ({"lokr_w1_a": (4, 2), "lokr_w1_b": (3, 4), "lokr_w2": (80, 80)}, ["ranks of lokr_w1_a and lokr_w1_b"]),
    ({"lora_up.weight": (320, 4), "lora_down.weight": (4, 320), "diff_b": (319,)}, ["diff_b", "320 outputs"]),
])
def test_inconsistent_shapes_are_refused(capsys, tmp_path, tensors, needles):
    path = tmp_path / "a.safetensors"
    save_file({f"{Q}.{suffix}": torch.ones(shape) for suffix, shape in tensors.items()}, str(path),
              metadata={"ss_base_model_version": "sd_v1"})
    merge_refused(capsys, tmp_path, path, *needles)


def test_a_lokr_that_expands_past_the_real_module_is_refused_before_allocating(tmp_path):
    # 192 KB on disk; its two full Kronecker operands describe a 65536×32768 weight (8 GiB as
    # float32) where SD1's to_q is 320×320
    path = tmp_path / "bomb.safetensors"
    save_file({f"{Q}.lokr_w1": torch.ones(256, 256, dtype=torch.float16) * 0.01,
               f"{Q}.lokr_w2": torch.ones(256, 128, dtype=torch.float16) * 0.01}, str(path),
              metadata={"ss_base_model_version": "sd_v1"})
    assert path.stat().st_size < 200_000
    start = time.perf_counter()
    with pytest.raises(LoraMergeError, match="larger than any real model"):
        loramerge.load(path)
    # within the budget but larger than SD1's to_q: refused by the key tables
    save_file({f"{Q}.lokr_w1": torch.ones(4, 4), f"{Q}.lokr_w2": torch.ones(160, 160)}, str(path),
              metadata={"ss_base_model_version": "sd_v1"})
    with pytest.raises(LoraMergeError, match=r"640×640 weight, but .*to_q is at most 320×320"):
        loramerge.load(path)
    assert time.perf_counter() - start < 10


def test_modules_in_blocks_no_variant_has_are_refused(capsys, tmp_path):
    beyond = "lora_unet_down_blocks_99_attentions_0_transformer_blocks_0_attn1_to_q"
    path = kohya(tmp_path / "a.safetensors", keys=(Q, beyond))
    merge_refused(capsys, tmp_path, path, "blocks that no sd1 model has", "down_blocks_99")
    text = "lora_te_text_model_encoder_layers_40_self_attn_q_proj"
    path = kohya(tmp_path / "a.safetensors", width=768, keys=(text,))
    merge_refused(capsys, tmp_path, path, "layers_40")
    # SD1's up_blocks.0 has no attention, but a small UNet laid out differently (the tiny world's)
    # has; its numbers lie within SD1's ranges, so it is read
    custom = "lora_unet_up_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    assert len(loramerge.load(kohya(tmp_path / "c.safetensors", width=32, keys=(custom,)))) == 1
    assert len(loramerge.load(loramerge.tinyworld.lora_paths()["bold"])) == 64


def test_forcing_another_architecture_on_exact_names_is_refused(capsys, tmp_path):
    # found by the fuzz suite: an SD1 file read --arch sdxl (its names exist in SDXL only up to
    # their numbers) was written as SDXL and could not be read back
    a = kohya(tmp_path / "a.safetensors")
    merge_refused(capsys, tmp_path, a, "is a sd1 or sd2 LoRA", "no sdxl model", "--arch sd1", extra=("--arch", "sdxl"))
    assert cli(capsys, "merge", a, "--arch", "sd1", "-o", tmp_path / "out.safetensors")[0] == 0


def test_dit_blocks_beyond_the_tables_are_read_with_a_warning(tmp_path):
    # Flux.1 has 38 single blocks (0–37); a longer custom Flux is read up to layer numbers
    name = "transformer.single_transformer_blocks.50.attn.to_q"
    save_file({f"{name}.lora_A.weight": torch.ones(2, 3072), f"{name}.lora_B.weight": torch.ones(3072, 2)},
              str(tmp_path / "long.safetensors"), metadata={"ss_base_model_version": "flux1"})  # Chroma fits too
    with pytest.warns(loramerge.errors.LoraMergeWarning, match="beyond the largest known flux model"):
        lora = loramerge.load(tmp_path / "long.safetensors")
    assert lora.arch == "flux" and "transformer.single_transformer_blocks.50.attn.to_q" in lora


@pytest.mark.parametrize("tensors,needles", [
    (100_001, ["100001 tensors"]),  # a million would be the same; the count is checked before parsing
])
def test_a_header_of_countless_tensors_is_refused_fast(capsys, tmp_path, tensors, needles):
    entry = '"t{}":{{"dtype":"F32","shape":[0],"data_offsets":[0,0]}}'
    header = "{" + ",".join(entry.format(i) for i in range(tensors)) + "}"
    raw_safetensors(tmp_path / "many.safetensors", header)
    start = time.perf_counter()
    merge_refused(capsys, tmp_path, tmp_path / "many.safetensors", *needles)
    assert time.perf_counter() - start < 5


def test_a_million_zero_size_tensors(tmp_path):
    entry = b'"t%d":{"dtype":"F32","shape":[0],"data_offsets":[0,0]}'
    header = b"{" + b",".join(entry % i for i in range(1_000_000)) + b"}"
    raw_safetensors(tmp_path / "million.safetensors", header)
    start = time.perf_counter()
    with pytest.raises(loramerge.errors.FileFormatError, match="1000000 tensors"):
        loramerge.load(tmp_path / "million.safetensors")
    assert time.perf_counter() - start < 2


def _one_tensor(value_json: str, field: str) -> str:
    entry = {"dtype": '"F32"', "shape": "[4]", "data_offsets": "[0, 16]"}
    entry[field] = value_json
    return "{" + f'"{Q}.lora_up.weight": {{' + ", ".join(f'"{k}": {v}' for k, v in entry.items()) + "}}"


@pytest.mark.parametrize("header,needle", [
    ('{"__metadata__": {"a": ' + "[" * 100_000 + "]" * 100_000 + "}}", "nested too deeply"),
    (_one_tensor("[Infinity]", "shape"), "not valid JSON"),
    (_one_tensor("[NaN]", "shape"), "not valid JSON"),
    (_one_tensor("[1e400]", "shape"), "corrupt header entry"),
    (_one_tensor("[" + "9" * 5000 + "]", "shape"), "not valid JSON"),
    (_one_tensor("[" + "9" * 40 + "]", "shape"), "does not match its shape"),
    (_one_tensor('["F32"]', "dtype"), "corrupt header entry"),
    (_one_tensor("[4.0]", "shape"), "corrupt header entry"),
    (_one_tensor("[true]", "shape"), "corrupt header entry"),
    (_one_tensor("[0, 16, 32]", "data_offsets"), "corrupt header entry"),
    (_one_tensor("[4]", "shape")[:-1] + ', "b": {"dtype": "F32", "shape": [2], "data_offsets": [8, 16]}}',
     "overlaps"),
])
def test_header_json_that_is_not_a_safetensors_header(capsys, tmp_path, header, needle):
    raw_safetensors(tmp_path / "bad.safetensors", header, b"\0" * 16)
    merge_refused(capsys, tmp_path, tmp_path / "bad.safetensors", "bad.safetensors", needle)


@pytest.mark.parametrize("metadata,needle", [
    ("[]", "not a JSON object"),
    ("null", "not a JSON object"),
    ('{"unet.lora_alpha": "abc"}', "lora_alpha must be a finite number"),
    ('{"unet.lora_alpha": NaN}', "lora_alpha must be a finite number"),
    ('{"unet.lora_alpha": 8, "unet.alpha_pattern": {"to_q(": 4}}', "not a valid regular expression"),
    ('{"unet.lora_alpha": 8, "unet.alpha_pattern": {"to_q": "x"}}', "must be a finite number"),
    ('{"unet.r": 4}', "no lora_alpha"),
    ('{"unet.lora_alpha": 8, "unet.use_rslora": "yes"}', "use_rslora"),
])
def test_malformed_lora_adapter_metadata_is_refused(capsys, tmp_path, metadata, needle):
    path = peft(tmp_path / "a.safetensors", metadata={"lora_adapter_metadata": metadata})
    merge_refused(capsys, tmp_path, path, "lora_adapter_metadata", needle)


@pytest.mark.parametrize("config,needle", [
    (b"[]", "expected a JSON object"),
    (b'{"unet": 5}', "no lora_alpha"),
    (b'{"lora_alpha": NaN, "r": 4}', "finite number"),
    (b'{"lora_alpha": 8, "r": 4, "base_model_name_or_path": "\xff\xfe"}', "not UTF-8"),
    (b"[" * 100_000, "not valid JSON"),
])
def test_malformed_adapter_config_is_refused(capsys, tmp_path, config, needle):
    folder = tmp_path / "adapter"
    folder.mkdir()
    peft(folder / "adapter_model.safetensors")
    (folder / "adapter_config.json").write_bytes(config)
    merge_refused(capsys, tmp_path, folder, "adapter_config.json", needle)


def test_metadata_alpha_is_used_when_valid(tmp_path):
    path = peft(tmp_path / "a.safetensors", metadata={"lora_adapter_metadata": '{"unet.lora_alpha": 8, "unet.r": 4}'})
    module = loramerge.load(path)[PEFT_Q]
    assert module.alpha == 8 and module.rank == 4


@pytest.mark.parametrize("recipe", [
    "[1, 2]", '{"method": "svd", "sources": [5]}', '{"method": 7, "sources": []}', "{not json", '"text"',
])
def test_foreign_or_malformed_embedded_recipe_never_crashes_inspect(capsys, tmp_path, recipe):
    path = kohya(tmp_path / "a.safetensors", metadata={"loramerge.recipe": recipe})
    code, out, err = cli(capsys, "inspect", path)
    assert code == 0, err
    assert "recipe        (unreadable:" in out
    code, out, err = cli(capsys, "inspect", path, "--json")
    assert code == 0 and "invalid" in json.loads(out)["recipe"]
    refused(capsys, tmp_path, "inspect", path, "--recipe", needles=["loramerge.recipe"])
    code, _, err = cli(capsys, "convert", path, "-o", tmp_path / "c.safetensors")
    assert code == 0 and "not carried over" in err
    assert "loramerge.recipe" not in loramerge.load(tmp_path / "c.safetensors").metadata


# ------------------------------------------------------------------------------------------------
# 2. one error boundary: one plain line, exit 2 (3 for a bug)


@pytest.mark.parametrize("name", ["a[/]b.safetensors", "[bold]x.safetensors", "new\nline.safetensors",
                                  "esc\x1b[31m.safetensors"])
def test_names_print_literally_on_one_line(capsys, tmp_path, name):
    line = refused(capsys, tmp_path, "inspect", tmp_path / name, needles=["no such file"])
    assert name.split(".")[0].replace("\n", "\\n").replace("\x1b", "\\x1b") in line


def test_titles_and_keys_print_literally_in_inspect(capsys, tmp_path):
    path = kohya(tmp_path / "a.safetensors", metadata={"modelspec.title": "[bold]x [/] two\nlines"})
    code, out, err = cli(capsys, "inspect", path)
    assert code == 0, err
    assert "title         [bold]x [/] two\\nlines" in out.splitlines()


def test_internal_errors_are_one_line_with_their_own_exit_code(capsys, tmp_path, monkeypatch):
    import loramerge.report

    def broken(*args, **kwargs):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(loramerge.report, "summarize", broken)
    path = kohya(tmp_path / "a.safetensors")
    code, _, err = cli(capsys, "inspect", path)
    line = assert_one_line(code, err, "internal error: ZeroDivisionError: a bug", "please report", exit_code=3)
    assert "Traceback" not in err and line
    with pytest.raises(ZeroDivisionError):
        cli(capsys, "inspect", path, env={"LORAMERGE_DEBUG": "1"})


@pytest.mark.parametrize("args,env,needle", [
    (["--device", "cuda"], {}, "CUDA is not available"),
    (["--device", "tpu"], {}, "unknown device"),
    (["--threads", "-1"], {}, "--threads"),
    (["--threads", "abc"], {}, "--threads"),
    ([], {"LORAMERGE_THREADS": "abc"}, "LORAMERGE_THREADS"),
    ([], {"LORAMERGE_THREADS": "-3"}, "LORAMERGE_THREADS"),
    ([], {"SOURCE_DATE_EPOCH": "abc"}, "SOURCE_DATE_EPOCH"),
    ([], {"SOURCE_DATE_EPOCH": "1e30"}, "SOURCE_DATE_EPOCH"),
    (["--bogus-option"], {}, "No such option"),
])
def test_bad_options_and_environment(capsys, tmp_path, args, env, needle):
    if "cuda" in args and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")  # pragma: no cover
    a = kohya(tmp_path / "a.safetensors")
    refused(capsys, tmp_path, "merge", a, *args, "-o", tmp_path / "out.safetensors", env=env, needles=[needle])


@pytest.mark.parametrize("text,needle", [
    (b"", "empty"),
    (b"# just a comment\n\n", "empty"),
    (b"sources: [a.safetensors]\n\xff\xfe\n", "not UTF-8"),
    (b"sources: [a.safetensors]\nmethod: !!python/object/apply:os.system [echo hi]\n", "line 2: the tag"),
    (b"sources: !!python/name:os.system []\n", "line 1: the tag"),
    (b"sources: [!custom a.safetensors]\n", "the tag '!custom'"),
    (b"sources: [{path: a.safetensors, block_weights: [[1, 2]]}]\noutput: o.safetensors\n", "a vector holds numbers"),
    (b"sources: [a.safetensors]\nrank: !!int abc\n", "line 2"),
    (b"sources: [a.safetensors]\n? [a, b]\n: 1\n", "field names"),
    (b"sources: [a.safetensors]\noutput: ../escaped.safetensors\n", "outside the recipe's folder"),
    (b"[" * 50_000, "nested too deeply"),
])
def test_bad_recipes(capsys, tmp_path, text, needle):
    kohya(tmp_path / "a.safetensors")
    (tmp_path / "r.yaml").write_bytes(text)
    refused(capsys, tmp_path.parent, "merge", "--recipe", tmp_path / "r.yaml", needles=[needle])


def test_a_recipe_may_write_below_its_folder_or_anywhere_absolute(capsys, tmp_path):
    kohya(tmp_path / "a.safetensors")
    (tmp_path / "sub").mkdir()
    (tmp_path / "r.yaml").write_text("sources: [a.safetensors]\noutput: sub/m.safetensors\n")
    assert cli(capsys, "merge", "--recipe", tmp_path / "r.yaml")[0] == 0
    assert (tmp_path / "sub" / "m.safetensors").is_file()
    other = tmp_path / "elsewhere"
    other.mkdir()
    (tmp_path / "r.yaml").write_text(f"sources: [a.safetensors]\noutput: {other / 'm.safetensors'}\n")
    assert cli(capsys, "merge", "--recipe", tmp_path / "r.yaml")[0] == 0
    assert (other / "m.safetensors").is_file()


def _fake_diffusers_folder(folder, model_index=None, unet_config=None):
    (folder / "unet").mkdir(parents=True)
    save_file({"conv_in.weight": torch.zeros(4, 4)}, str(folder / "unet" / "diffusion_pytorch_model.safetensors"))
    if model_index is not None:
        (folder / "model_index.json").write_bytes(model_index)
    if unet_config is not None:
        (folder / "unet" / "config.json").write_bytes(unet_config)
    return folder


@pytest.mark.parametrize("model_index,unet_config,needle", [
    (b"\xff\xfe{}", None, "model_index.json is not valid JSON"),
    (b"[" * 100_000, None, "model_index.json is not valid JSON"),
    (None, b'{"_class_name": ["UNet2DConditionModel"]}', "_class_name is not a string"),
    (b'{"_class_name": {"a": 1}}', None, "_class_name is not a string"),
])
def test_corrupt_configs_of_a_fuse_base_folder(capsys, tmp_path, model_index, unet_config, needle):
    base = _fake_diffusers_folder(tmp_path / "base", model_index, unet_config)
    a = kohya(tmp_path / "a.safetensors")
    refused(capsys, tmp_path, "fuse", "--base", base, "--lora", a, "-o", tmp_path / "fused", needles=[needle])


def test_analyze_output_is_checked_before_computing(capsys, tmp_path, monkeypatch):
    import loramerge.analysis

    def never(*args, **kwargs):
        raise AssertionError("computed before checking the output")

    monkeypatch.setattr(loramerge.analysis, "analyze", never)
    a, b = kohya(tmp_path / "a.safetensors"), kohya(tmp_path / "b.safetensors", seed=1)
    (tmp_path / "file").write_text("x")
    refused(capsys, tmp_path, "analyze", a, b, "--out", tmp_path / "file", needles=["must be a folder"])
    refused(capsys, tmp_path, "analyze", a, b, "--out", tmp_path / "no" / "such", needles=["does not exist"])
    (tmp_path / "report" / "analysis.json").mkdir(parents=True)
    refused(capsys, tmp_path, "analyze", a, b, "--out", tmp_path / "report", needles=["is a folder"])


def test_analyze_writes_a_new_folder_and_replaces_its_own_files(capsys, tmp_path):
    a, b = kohya(tmp_path / "a.safetensors"), kohya(tmp_path / "b.safetensors", seed=1)
    for _ in range(2):
        code, _, err = cli(capsys, "analyze", a, b, "--out", tmp_path / "new")
        assert code == 0, err
        assert sorted(p.name for p in (tmp_path / "new").iterdir()) == ["analysis.json", "similarity.png", "spectra.png"]
    assert json.loads((tmp_path / "new" / "analysis.json").read_text())["loras"] == ["a", "b"]
    assert not temps(tmp_path)


def test_generate_output_is_checked_before_rendering(capsys, tmp_path, monkeypatch):
    import loramerge.generate

    def never(*args, **kwargs):
        raise AssertionError("loaded the pipeline before checking the output")

    monkeypatch.setattr(loramerge.generate, "load_pipeline", never)
    base = tmp_path / "pipe"
    base.mkdir()
    refused(capsys, tmp_path, "generate", "--base", base, "--prompt", "x", "-o", tmp_path / "no" / "x.png",
            needles=["does not exist"])
    os.mkfifo(tmp_path / "fifo.png")
    refused(capsys, tmp_path, "generate", "--base", base, "--prompt", "x", "-o", tmp_path / "fifo.png",
            needles=["FIFO"])


# ------------------------------------------------------------------------------------------------
# 3. output targets


def test_special_files_are_never_replaced(capsys, tmp_path):
    a = kohya(tmp_path / "a.safetensors")
    os.mkfifo(tmp_path / "fifo.safetensors")
    refused(capsys, tmp_path, "merge", a, "-o", tmp_path / "fifo.safetensors", needles=["a FIFO"])
    assert stat.S_ISFIFO(os.lstat(tmp_path / "fifo.safetensors").st_mode)
    if os.geteuid() == 0:  # a copy of /dev/null: the same kind of file, without touching the real one
        os.mknod(tmp_path / "null", 0o666 | stat.S_IFCHR, os.makedev(1, 3))
        refused(capsys, tmp_path, "convert", a, "-o", tmp_path / "null", needles=["a character device"])
        assert stat.S_ISCHR(os.lstat(tmp_path / "null").st_mode)
    (tmp_path / "folder.safetensors").mkdir()
    refused(capsys, tmp_path, "merge", a, "-o", tmp_path / "folder.safetensors", needles=["is a folder"])


def test_dev_null_is_refused_without_writing():
    from loramerge.errors import OutputPathError
    from loramerge.outputs import check_output

    with pytest.raises(OutputPathError, match="character device"):
        check_output("/dev/null")


def test_symlinks_are_refused_unless_followed(capsys, tmp_path):
    a = kohya(tmp_path / "a.safetensors")
    (tmp_path / "target.safetensors").write_bytes(b"old")
    os.symlink("target.safetensors", tmp_path / "link.safetensors")
    refused(capsys, tmp_path, "merge", a, "-o", tmp_path / "link.safetensors", needles=["symbolic link"])
    code, _, err = cli(capsys, "merge", a, "-o", tmp_path / "link.safetensors", "--follow-symlinks")
    assert code == 0, err
    assert os.path.islink(tmp_path / "link.safetensors")
    assert len(loramerge.load(tmp_path / "target.safetensors")) == 2
    os.symlink("a.safetensors", tmp_path / "alias.safetensors")  # following it must not reach an input
    refused(capsys, tmp_path, "convert", a, "-o", tmp_path / "alias.safetensors", "--follow-symlinks",
            needles=["overwrite the input"])


def test_fuse_output_inside_the_base_folder_is_refused(capsys, tmp_path):
    base = _fake_diffusers_folder(tmp_path / "base")
    a = kohya(tmp_path / "a.safetensors")
    refused(capsys, tmp_path, "fuse", "--base", base, "--lora", a, "-o", base / "fused", needles=["inside the input folder"])


_WRITER = """
import sys, time
from loramerge.outputs import Staged
staged = Staged([sys.argv[1]])
staged.temps[0].write_bytes(b"partial")
print("ready", flush=True)
time.sleep(60)
"""


def test_temp_files_are_removed_on_sigterm(tmp_path):
    target = tmp_path / "out.safetensors"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    child = subprocess.Popen([sys.executable, "-c", _WRITER, str(target)], stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert child.stdout.readline().strip() == "ready"
        assert len(temps(tmp_path)) == 1
        child.send_signal(signal.SIGTERM)
        assert child.wait(timeout=30) == -signal.SIGTERM  # the default action, restored
    finally:
        child.kill()
    assert not temps(tmp_path) and not target.exists()


def _dead_pid() -> int:
    pid = 4_000_000
    while True:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return pid
        except PermissionError:
            pass
        pid += 1


def test_stale_temp_files_are_named_and_removed(capsys, tmp_path):
    a = kohya(tmp_path / "a.safetensors")
    stale = tmp_path / f".out.safetensors.{_dead_pid()}.tmp"
    live = tmp_path / f".out.safetensors.{os.getppid()}.tmp"
    stale.write_bytes(b"left by a killed run")
    live.write_bytes(b"being written")
    code, _, err = cli(capsys, "merge", a, "-o", tmp_path / "out.safetensors")
    assert code == 0, err
    warnings = [line for line in err.splitlines() if line.startswith("warning: ")]
    assert any(stale.name in w and "removed a stale temp file" in w for w in warnings), err
    assert any(live.name in w and "still writing" in w for w in warnings), err
    assert not stale.exists() and live.exists()


def test_a_failed_plot_leaves_the_previous_analysis_whole(tmp_path, monkeypatch):
    import matplotlib.figure

    from loramerge.analysis import write_report

    result = {"loras": ["a", "b"], "density": 0.2, "spectra": {"a": [1.0], "b": [1.0]},
              "blocks": {"unet.down.0": {"modules": 1, "cosine": {"a|b": 0.5}, "sign_conflict": {"a|b": 0.1}}}}
    folder = tmp_path / "report"
    write_report(result, folder)
    before = snapshot(folder)

    def broken(*args, **kwargs):
        raise RuntimeError("renderer failed")

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", broken)
    changed = {**result, "density": 0.9}
    with pytest.raises(RuntimeError):
        write_report(changed, folder)
    assert snapshot(folder) == before and not temps(tmp_path)


def test_every_artefact_writer_uses_the_one_rename_helper():
    """Only outputs.py renames files into place (the temp file + rename helper)."""
    import pathlib
    import re

    src = pathlib.Path(loramerge.__file__).parent
    offenders = []
    for path in src.rglob("*.py"):
        if path.name in ("outputs.py", "demo.py", "composition.py"):  # demo/composition: tiny world's owners
            continue
        text = path.read_text()
        if re.search(r"os\.(replace|rename)\(|\.tmp\b", text):
            offenders.append(str(path.relative_to(src)))
    assert offenders == []


# ------------------------------------------------------------------------------------------------
# correct results are still correct


def test_valid_inputs_still_merge(capsys, tmp_path):
    a = kohya(tmp_path / "a.safetensors")
    b = kohya(tmp_path / "b.safetensors", seed=1, dtype=torch.float16)
    code, _, err = cli(capsys, "merge", f"{a}:0.5", f"{b}:0.5", "-o", tmp_path / "m.safetensors",
                       env={"SOURCE_DATE_EPOCH": "0", "LORAMERGE_THREADS": "1"})
    assert code == 0, err
    merged = loramerge.load(tmp_path / "m.safetensors")
    key = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_k"
    expected = 0.5 * (loramerge.load(a)[key].delta() + loramerge.load(b)[key].delta())
    assert torch.allclose(merged[key].delta(), expected, atol=1e-3)
    assert merged.metadata["modelspec.date"] == "1970-01-01T00:00:00"
