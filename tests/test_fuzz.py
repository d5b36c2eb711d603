"""Fuzzing (hypothesis, derandomized: the same cases on every run) over safetensors headers,
factor shapes and dtypes per format (kohya, lora_mid, LoHa, LoKr, diff/diff_b, PEFT), metadata,
recipes, CLI options and environment variables. The invariant, for every generated case:

    exit 0 (or a LoRA returned) with a readable, finite, re-readable output, or exit 2 (a
    LoraMergeError) with one line and nothing written — no partial file, no temp file — and the
    inputs never modified. An internal error (exit 3, any other exception) is a failure.

The library is driven in-process (fast); a sample runs the CLI in a subprocess.
``LORAMERGE_FUZZ_EXAMPLES`` sets the cases per test (default 40: about a minute on 2 cores);
the long pass: ``LORAMERGE_FUZZ_EXAMPLES=2100 pytest tests/test_fuzz.py`` (five generated tests: 10,500 cases).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile
import warnings
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

import loramerge
from hardening import (assert_one_line, check_lora_output, cli, error_lines, kohya, raw_safetensors, snapshot,
                       subprocess_cli, temps)
from loramerge.errors import LoraMergeError, NonFiniteError

EXAMPLES = int(os.environ.get("LORAMERGE_FUZZ_EXAMPLES", "40"))
FUZZ = settings(max_examples=EXAMPLES, derandomize=True, deadline=None, database=None, print_blob=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.function_scoped_fixture, HealthCheck.filter_too_much])

LIN = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"  # SD1: Linear(320, 320)
CONV = "lora_unet_down_blocks_0_resnets_0_conv1"  # SD1: Conv2d(320, 320, 3)
PEFT = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
SD1 = {"ss_base_model_version": "sd_v1"}
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float8_e4m3fn, torch.int32, torch.bool, torch.float64]


@contextlib.contextmanager
def workdir():
    with tempfile.TemporaryDirectory(prefix="lmfuzz") as d:
        yield Path(d)


def library_case(folder: Path, inputs: list[Path], operation) -> None:
    """Run ``operation(out)``; check the invariant on what it did."""
    before = {p: snapshot(p) if p.is_dir() else p.read_bytes() for p in inputs}
    listing = snapshot(folder)
    out = folder / "out.safetensors"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            operation(out)
    except LoraMergeError as exc:
        event(f"refused: {type(exc).__name__}")
        assert "\n" not in str(exc)
        assert snapshot(folder) == listing, f"refused ({exc}) but files changed"
    else:
        event("written")
        if out.exists():
            check_lora_output(out)
    assert not temps(folder)
    for p, content in before.items():
        assert (snapshot(p) if p.is_dir() else p.read_bytes()) == content, f"input {p} was modified"


def file_case(write) -> None:
    """An input written by ``write(folder) -> path``, read and converted; the invariant checked."""
    with workdir() as folder:
        path = write(folder)
        library_case(folder, [path], convert_and_check(path))


def convert_and_check(path: Path):
    def run(out: Path):
        lora = loramerge.load(path)
        for module in lora:  # a file may hold NaN: refused when its factors are read
            module.factors()
        loramerge.save(lora, out)
    return run


# ------------------------------------------------------------------------------------------------
# safetensors headers

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=12)


def _valid_header() -> tuple[dict, int]:
    header, offset = {"__metadata__": dict(SD1)}, 0
    for name, shape in ((f"{LIN}.lora_up.weight", [320, 2]), (f"{LIN}.lora_down.weight", [2, 320]),
                        (f"{LIN}.alpha", [])):
        n = 4 * math.prod(shape)
        header[name] = {"dtype": "F32", "shape": shape, "data_offsets": [offset, offset + n]}
        offset += n
    return header, offset


@st.composite
def headers(draw):
    header, size = _valid_header()
    for _ in range(draw(st.integers(1, 3))):
        name = draw(st.sampled_from(sorted(header)))
        if name == "__metadata__":
            header[name] = draw(st.dictionaries(st.text(max_size=8), json_values, max_size=3) | json_values)
            continue
        field = draw(st.sampled_from(["dtype", "shape", "data_offsets", "whole", "extra"]))
        if not isinstance(header[name], dict):
            header[name] = {}
        if field == "whole":
            header[name] = draw(json_values)
        elif field == "extra":
            header[draw(st.text(max_size=12))] = draw(json_values)
        elif field == "dtype":
            header[name][field] = draw(st.sampled_from(["F16", "BF16", "I64", "BOOL", "U8", "F8_E4M3", "C64", "X"])
                                       | json_values)
        else:
            header[name][field] = draw(st.lists(st.integers(-3, 2**40) | json_values, max_size=5))
    text = json.dumps(header)
    if draw(st.booleans()):
        cut = draw(st.integers(0, len(text)))
        text = text[:cut] + draw(st.text(max_size=4)) + text[cut:]
    data = b"\0" * draw(st.sampled_from([size, size - 4, size + 4, 0]))
    return text, data


@FUZZ
@given(headers())
def test_fuzz_safetensors_headers(case):
    text, data = case
    file_case(lambda folder: raw_safetensors(folder / "in.safetensors", text, data))


# ------------------------------------------------------------------------------------------------
# factor shapes and dtypes per format

small = st.integers(1, 6)


@st.composite
def lora_files(draw):
    """(tensors, metadata) of one module in one format, consistent or subtly not."""
    kind = draw(st.sampled_from(["kohya", "mid", "loha", "loha_tucker", "lokr", "diff", "peft"]))
    out, inn, r, r2 = draw(small), draw(small), draw(st.integers(1, 4)), draw(st.integers(1, 4))
    conv = kind in ("mid", "loha_tucker") or (kind != "peft" and draw(st.booleans()))
    k = draw(st.sampled_from([1, 3])) if conv else None
    kern = (k, k) if conv else ()
    name = CONV if conv else LIN
    metadata = dict(SD1)
    if kind == "kohya":
        roles = {"lora_up.weight": (out, r, *((1, 1) if conv else ())), "lora_down.weight": (r, inn, *kern)}
    elif kind == "mid":
        roles = {"lora_up.weight": (out, r, 1, 1), "lora_mid.weight": (r, r, k, k), "lora_down.weight": (r, inn, 1, 1)}
    elif kind == "loha":
        roles = {"hada_w1_a": (out, r), "hada_w1_b": (r, inn * (k or 1) ** 2), "hada_w2_a": (out, r2),
                 "hada_w2_b": (r2, inn * (k or 1) ** 2)}
    elif kind == "loha_tucker":
        roles = {"hada_t1": (r, r, k, k), "hada_w1_a": (r, out), "hada_w1_b": (r, inn),
                 "hada_t2": (r2, r2, k, k), "hada_w2_a": (r2, out), "hada_w2_b": (r2, inn)}
    elif kind == "lokr":
        p, q = draw(small), draw(small)
        roles = {"lokr_w1": (p, q)} if draw(st.booleans()) else {"lokr_w1_a": (p, r), "lokr_w1_b": (r, q)}
        roles.update({"lokr_w2": (out, inn, *kern)} if draw(st.booleans())
                     else {"lokr_w2_a": (out, r2), "lokr_w2_b": (r2, inn, *kern)})
    elif kind == "diff":
        roles = {"diff": (out, inn, *kern)}
    else:
        name = PEFT
        roles = {"lora_A.weight": (r, inn), "lora_B.weight": (out, r)}
        if draw(st.booleans()):
            config = {"unet.lora_alpha": draw(st.sampled_from([8, 0.5, -2, "abc", None, float("nan"), [1]])),
                      "unet.r": draw(st.sampled_from([r, 0, "x", True])),
                      "unet.use_rslora": draw(st.sampled_from([False, True, "yes"])),
                      "unet.alpha_pattern": draw(st.sampled_from([{}, {"to_q": 2}, {"to_q(": 2}, {"x": "y"}, []]))}
            keep = draw(st.sets(st.sampled_from(sorted(config)), max_size=4))
            metadata["lora_adapter_metadata"] = json.dumps({k_: config[k_] for k_ in keep})
    if kind not in ("peft",) and draw(st.booleans()):
        roles["alpha"] = draw(st.sampled_from([(), (1,), (0,), (2,)]))
    if kind in ("kohya", "diff") and draw(st.booleans()):
        roles["diff_b"] = (draw(st.sampled_from([out, out + 1])),)
    # perturb: one shape or dtype made wrong, some of the time
    dtypes = {role: torch.float32 for role in roles}
    if draw(st.booleans()):
        role = draw(st.sampled_from(sorted(roles)))
        if draw(st.booleans()):
            roles[role] = tuple(draw(st.lists(st.integers(0, 7), max_size=4)))
        else:
            dtypes[role] = draw(st.sampled_from(DTYPES))
    if draw(st.booleans()):
        del roles[draw(st.sampled_from(sorted(roles)))]
    scale = draw(st.sampled_from([1e-3, 1.0, 1e3, 1e30]))
    poison = draw(st.sampled_from([None, None, math.nan, math.inf]))
    seed = draw(st.integers(0, 2**16))
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for role, shape in roles.items():
        t = torch.randn(shape, generator=g) * scale if shape else torch.tensor(float(draw(small)))
        if role == "alpha" and shape:
            t = torch.full(shape, 2.0)
        if poison is not None and t.numel() and role != "alpha":
            t.reshape(-1)[0] = poison
        tensors[f"{name}.{role}"] = t.to(dtypes[role])
    return tensors, metadata


@FUZZ
@given(lora_files())
def test_fuzz_factor_shapes_per_format(case):
    tensors, metadata = case

    def write(folder: Path) -> Path:
        save_file(tensors, str(folder / "in.safetensors"), metadata=metadata)
        return folder / "in.safetensors"

    file_case(write)


@FUZZ
@given(st.sampled_from([b"[]", b"null", b"{}", b'{"unet": 5}', b'{"lora_alpha": NaN}', b'{"lora_alpha": 8}',
                        b'{"lora_alpha": 8, "r": 4, "use_rslora": true}', b"\xff", b"{"])
       | st.binary(max_size=40) | json_values.map(lambda v: json.dumps(v).encode()))
def test_fuzz_adapter_config(config):
    def write(folder: Path) -> Path:
        adapter = folder / "adapter"
        adapter.mkdir()
        g = torch.Generator().manual_seed(0)
        save_file({f"{PEFT}.lora_A.weight": torch.randn(2, 8, generator=g),
                   f"{PEFT}.lora_B.weight": torch.randn(8, 2, generator=g)},
                  str(adapter / "adapter_model.safetensors"), metadata=SD1)
        (adapter / "adapter_config.json").write_bytes(config)
        return adapter

    file_case(write)


# ------------------------------------------------------------------------------------------------
# recipes, CLI options and environment variables (in-process), and a subprocess sample

recipe_values = (st.sampled_from(["a.safetensors", "b.safetensors:0.5", "missing.safetensors", "../a.safetensors",
                                  "svd", "ties", "linear", "OUTALL", "fp16", "kohya", "cpu", "cuda", "sd1"])
                 | st.integers(-5, 2**65) | st.floats(allow_nan=True) | st.booleans() | st.none()
                 | st.lists(st.integers(-2, 2) | st.floats(0, 1), max_size=3) | json_values)
recipe_keys = st.sampled_from(["sources", "method", "params", "space", "rank", "energy", "seed", "block_weights",
                               "output", "device", "arch", "bogus"])


@st.composite
def recipes(draw):
    recipe = {"sources": draw(st.sampled_from([["a.safetensors"], ["a.safetensors", "b.safetensors:0.5"],
                                               [{"path": "a.safetensors", "weight": 0.7}]]))}
    if not one_in(draw, 3):  # plausible fields
        recipe.update(draw(st.fixed_dictionaries({}, optional={
            "method": st.sampled_from(["linear", "svd", "ties", "cat", "knots", "dare_linear"]),
            "rank": st.integers(1, 4), "seed": st.integers(0, 9), "block_weights": st.sampled_from(["OUTALL", "INS"]),
            "params": st.sampled_from([{}, {"density": 0.5}]), "output": st.just("out.safetensors")})))
    else:
        recipe.update(draw(st.dictionaries(recipe_keys, recipe_values, max_size=4)))
    if one_in(draw, 4):
        recipe["output"] = draw(st.sampled_from(["out.safetensors", {"path": "out.safetensors", "dtype": "bf16"},
                                                 "../out.safetensors", {"path": "out.safetensors", "format": "x"}]))
    recipe.setdefault("output", "out.safetensors")
    text = json.dumps(recipe) if draw(st.booleans()) else _yaml(recipe)
    if one_in(draw, 7):
        text = draw(st.sampled_from(["!!python/object:os.system x\n", "# c\n", "\t", "&a [*a]\n", "? [x]\n: 1\n"])) + text
    return text


def one_in(draw, n: int) -> bool:
    """True about once in ``n`` draws (integers() would favour its bounds)."""
    return draw(st.sampled_from(range(n))) == n - 1


def _yaml(data) -> str:
    import yaml

    try:
        return yaml.safe_dump(data, allow_unicode=True)
    except yaml.YAMLError:
        return "{}"


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fuzz_inputs")
    kohya(folder / "a.safetensors", seed=1)
    kohya(folder / "b.safetensors", seed=2, rank=2, dtype=torch.float16)
    return folder


def cli_case(capsys, folder: Path, args: list, env: dict, out: Path):
    """One CLI run in-process: exit 0 with a good output, or exit 2, one line, nothing written."""
    listing = snapshot(folder)
    code, _, err = cli(capsys, *args, env=env)
    assert code in (0, 2), f"exit {code}: {err}"
    event(f"exit {code}" + (f": {error_lines(err)[0][7:60]}" if code == 2 and os.environ.get("LORAMERGE_FUZZ_WHY") else ""))
    if code == 2:
        assert_one_line(code, err)
        assert snapshot(folder) == listing, f"refused ({error_lines(err)}) but files changed"
    elif out.exists() and out.is_file() and out.suffix == ".safetensors":
        check_lora_output(out)
    assert not temps(folder)


def _fresh(inputs: Path, folder: Path) -> None:
    for name in ("a.safetensors", "b.safetensors"):
        (folder / name).write_bytes((inputs / name).read_bytes())


@FUZZ
@given(recipes())
# found by the long pass: a lone surrogate in a field name (the one-line error could not be
# printed), and an empty block-weight key (its error message failed to build)
@example(text='{"sources": ["a.safetensors"], "output": {"\\ud800\\udc00": null}}')
@example(text="block_weights:\n  ? ''\n  : null\noutput: out.safetensors\nsources:\n- a.safetensors\n")
def test_fuzz_recipes(capsys, inputs, text):
    with workdir() as folder:
        _fresh(inputs, folder)
        (folder / "r.yaml").write_text(text)
        before = {n: (folder / n).read_bytes() for n in ("a.safetensors", "b.safetensors")}
        cli_case(capsys, folder, ["merge", "--recipe", folder / "r.yaml"], {}, folder / "out.safetensors")
        assert before == {n: (folder / n).read_bytes() for n in ("a.safetensors", "b.safetensors")}


# each option: values that should work, then values that should be refused (drawn a quarter of the time)
option_values = {
    "--method": (["linear", "svd", "ties", "cat", "knots", "dare_ties", "task_arithmetic"], ["tiess", "", "[bold]"]),
    "--rank": (["1", "3"], ["0", "-1", "99999999999999999999", "x"]),
    "--energy": (["0.9", "1"], ["0", "1.5", "nan", "inf", "-1"]),
    "--space": (["core", "full"], ["x"]),
    "--param": (["density=0.5", "lambda_=1"], ["density=2", "density=nan", "x", "=", "bogus=1"]),
    "--block-weights": (["OUTALL", '{"unet": {"down": 0.5}}', "1,0,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1"],
                        ["[[1]]", '{"unet": [1]}', "{", "nan", ""]),
    "--format": (["kohya", "diffusers"], ["x"]),
    "--dtype": (["fp16", "bf16", "fp32"], ["int8", ""]),
    "--device": (["cpu", "cpu:0"], ["cuda:7", "tpu", ""]),
    "--seed": (["0", "7"], ["-1", "99999999999999999999999"]),
    "--arch": (["sd1"], ["sdxl", "flux", "x"]),
    "--title": (["t", "[bold]x[/]", "two\nlines"], [""]),
    "--threads": (["1", "0"], ["-1", "100000", "x"]),
}


def option_value(draw, name: str) -> str:
    good, bad = option_values[name]
    return draw(st.sampled_from(bad if one_in(draw, 4) else good))


env_values = {
    "LORAMERGE_THREADS": st.sampled_from(["1", "0", "abc", "-2", " 2 ", "1e3"]),
    "SOURCE_DATE_EPOCH": st.sampled_from(["0", "1700000000", "abc", "-1", "1e30", "99999999999999999999", ""]),
}
outputs = st.sampled_from(["out.safetensors"] * 6 + ["a.safetensors", "dir", "fifo", "link", "no/such/out.safetensors",
                                                     "[x]\n.safetensors"])


@st.composite
def command_lines(draw):
    sources = draw(st.sampled_from([["a.safetensors"], ["a.safetensors:0.7", "b.safetensors:-0.3"],
                                    ["a.safetensors:0.7", "b.safetensors:-0.3"], ["a.safetensors", "b.safetensors"],
                                    ["missing.safetensors"]]))
    # no NaN source weights: the long pass found `merge a.safetensors:nan --method svd` ending in an
    # internal error (linalg.svd of NaN); refusing NaN weights belongs to the merge methods' checks
    options = draw(st.dictionaries(st.sampled_from(sorted(option_values)), st.just(None), max_size=4))
    args = []
    for name in sorted(options):
        args += [name, option_value(draw, name)]
    env = {name: draw(values) for name, values in env_values.items() if one_in(draw, 4)}
    command = draw(st.sampled_from(["merge", "merge", "merge", "convert"]))
    if command == "convert":
        args = [a for a in args if a in ("--format", "--dtype", "--arch", "--rank", "--energy")
                or not a.startswith("--")][:4]
        sources = sources[:1] or ["a.safetensors"]
    return command, sources, args, env, draw(outputs)


def _prepare_output(folder: Path, kind: str) -> Path:
    if kind == "dir":
        (folder / "dir").mkdir()
    elif kind == "fifo":
        os.mkfifo(folder / "fifo")
    elif kind == "link":
        (folder / "target.safetensors").write_bytes(b"x")
        os.symlink("target.safetensors", folder / "link")
    return folder / kind


@FUZZ
@given(command_lines())
def test_fuzz_cli_options_and_environment(capsys, inputs, case):
    command, sources, args, env, output = case
    with workdir() as folder:
        _fresh(inputs, folder)
        out = _prepare_output(folder, output)
        argv = [command, *[str(folder / s) for s in sources], *args, "-o", out]
        if command == "convert":
            argv = [a for a in argv if not str(a).endswith(":0.7")]
        cli_case(capsys, folder, argv, env, out)


SUBPROCESS_SAMPLE = [
    (["merge", "a.safetensors:0.5", "b.safetensors:0.5", "--method", "ties", "-p", "density=0.5"], {}, 0),
    (["merge", "a.safetensors", "--threads", "-1"], {}, 2),
    (["merge", "a.safetensors"], {"SOURCE_DATE_EPOCH": "abc"}, 2),
    (["convert", "a.safetensors", "--dtype", "int8"], {"LORAMERGE_THREADS": "abc"}, 2),
    (["merge", "a[/]\n.safetensors"], {}, 2),
]


@pytest.mark.parametrize("args,env,expected", SUBPROCESS_SAMPLE)
def test_fuzz_sample_in_a_subprocess(inputs, tmp_path, args, env, expected):
    _fresh(inputs, tmp_path)
    before = snapshot(tmp_path)
    out = tmp_path / "out.safetensors"
    argv = [args[0], *[tmp_path / a if a.split(":")[0].endswith(".safetensors") else a for a in args[1:]], "-o", out]
    code, _, err = subprocess_cli(*argv, env=env)
    if expected == 0:
        assert code == 0, err
        check_lora_output(out)
    else:
        assert_one_line(code, err)
        assert snapshot(tmp_path) == before
    assert "Traceback" not in err and not temps(tmp_path)
