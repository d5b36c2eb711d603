"""Live mixing in a diffusers pipeline: exact patches, exact restores after 1,000 switches in
fp16 and bf16, only changed modules touched, and no recompilation under torch.compile."""

import pytest
import torch

import loramerge
import tiny

ATTENTION = lambda mods: {k: v for k, v in mods.items() if "attentions" in k[1]}  # noqa: E731
TEXT = lambda mods: {k: v for k, v in mods.items() if k[0] == "text_encoder"}  # noqa: E731


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("mix")
    pipe = tiny.sd15_pipeline()
    mods = tiny.targets(pipe, ("unet", "text_encoder"))
    a = tiny.random_factors({**ATTENTION(mods), **TEXT(mods)}, rank=4, alpha=2.0, seed=1)
    b = tiny.random_factors(ATTENTION(mods), rank=3, alpha=6.0, seed=2)
    c = tiny.random_factors(TEXT(mods), rank=2, alpha=None, seed=3)
    tiny.write_kohya(folder / "a.safetensors", "sd1", a)
    tiny.write_diffusers(folder / "b.safetensors", b)
    tiny.write_kohya(folder / "c.safetensors", "sd1", c)
    return folder, {"a": a, "b": b, "c": c}


def snapshot(pipe):
    return {n: p.detach().clone() for n, p in pipe.unet.named_parameters()} | {
        "te." + n: p.detach().clone() for n, p in pipe.text_encoder.named_parameters()}


def test_fused_weights_match_diffusers(files):
    folder, factors = files
    pipe = tiny.sd15_pipeline()
    mix = loramerge.attach(pipe, {"a": folder / "a.safetensors", "b": folder / "b.safetensors"})
    mix.set_weights({"a": 0.7, "b": -0.4})
    mix.fuse(scale=0.9)
    ref = tiny.sd15_pipeline()
    ref.load_lora_weights(str(folder / "a.safetensors"), adapter_name="a")
    ref.load_lora_weights(str(folder / "b.safetensors"), adapter_name="b")
    ref.set_adapters(["a", "b"], adapter_weights=[0.7, -0.4])
    ref.fuse_lora(components=["unet", "text_encoder"], lora_scale=0.9)
    base = tiny.sd15_pipeline()
    for (component, name) in {**factors["a"], **factors["b"]}:
        ours = tiny.weight_of(pipe, component, name).detach()
        theirs = tiny.weight_of(ref, component, name).detach()
        delta = theirs - tiny.weight_of(base, component, name).detach()
        assert float((ours - theirs).norm() / delta.norm()) < 1e-5, name
    assert mix.memory_cost() == sum(t.numel() * 4 for t in mix._original.values()) > 0


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_restore_is_bitwise_after_1000_switches(files, dtype):
    folder, _ = files
    pipe = tiny.sd15_pipeline()
    pipe.unet.to(dtype)
    pipe.text_encoder.to(dtype)
    original = snapshot(pipe)
    mix = loramerge.attach(pipe, {n: folder / f"{n}.safetensors" for n in "abc"})
    mixes = [{"a": 0.7, "b": 0.8, "c": 0.0}, {"a": 0.2, "b": -1.0, "c": 1.5}]
    mix.set_weights(mixes[0])
    mix.fuse()
    first = snapshot(pipe)
    for cycle in range(1000):
        mix.set_weights(mixes[(cycle + 1) % 2])
    assert all(torch.equal(first[k], v) for k, v in snapshot(pipe).items())  # back on mix 0: same bits
    for _ in range(10):
        mix.unfuse()
        mix.fuse(0.5)
    mix.unfuse()
    assert all(torch.equal(original[k], v) for k, v in snapshot(pipe).items())
    mix.detach()


def test_switching_touches_only_changed_modules(files):
    folder, factors = files
    pipe = tiny.sd15_pipeline()
    mix = loramerge.attach(pipe, {"b": folder / "b.safetensors", "c": folder / "c.safetensors"})
    assert mix.fuse() == len(factors["b"]) + len(factors["c"])
    before = snapshot(pipe)
    mix.set_weights({"c": 0.3})  # only the text-encoder LoRA changes
    after = snapshot(pipe)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith("te.") for k in changed)
    assert mix.fuse() == 0  # nothing left to do


def test_merged_result_attaches_like_a_file(files):
    folder, factors = files
    merged = loramerge.merge([folder / "a.safetensors", folder / "b.safetensors"], [0.5, 0.5], method="ties",
                             density=0.8, device="cpu")
    pipe = tiny.sd15_pipeline()
    base = snapshot(pipe)
    mix = loramerge.attach(pipe, {"merged": merged})
    mix.fuse()
    name = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    expected = base[name + ".weight"] + merged["unet." + name].delta()
    assert torch.allclose(pipe.unet.get_submodule(name).weight, expected, atol=1e-6)


def test_no_recompilation_when_switching(files):
    from torch._dynamo.testing import CompileCounter

    folder, _ = files
    torch._dynamo.reset()
    pipe = tiny.sd15_pipeline()
    counter = CompileCounter()
    compiled = torch.compile(pipe.unet, backend=counter)
    sample = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    hidden = torch.randn(1, 5, 32, generator=torch.Generator().manual_seed(1))
    mix = loramerge.attach(pipe, {n: folder / f"{n}.safetensors" for n in "ab"})
    with torch.no_grad():
        compiled(sample, 10, hidden)
        frames = counter.frame_count
        outputs = []
        for weights in ({"a": 1.0, "b": 0.0}, {"a": 0.0, "b": 1.0}, {"a": 0.5, "b": 0.5}):
            mix.set_weights(weights)
            mix.fuse()
            outputs.append(compiled(sample, 10, hidden).sample)
            eager = pipe.unet(sample, 10, hidden).sample
            assert torch.allclose(outputs[-1], eager, atol=1e-5)  # the compiled graph sees the new weights
        mix.unfuse()
        compiled(sample, 10, hidden)
    assert counter.frame_count == frames, f"recompiled: {frames} → {counter.frame_count}"
    assert not torch.allclose(outputs[0], outputs[1])
