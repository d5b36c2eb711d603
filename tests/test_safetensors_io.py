"""Our safetensors writer against the official reader; header validation; atomic writes."""

import struct

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file as official_save

from loramerge.errors import FileFormatError, OutputPathError
from loramerge.formats.safetensors_io import StreamingWriter, TensorSpec, read_header, save_file


def sample():
    g = torch.Generator().manual_seed(0)
    return {
        "b.weight": torch.randn(3, 5, generator=g).to(torch.float16),
        "a.weight": torch.randn(4, generator=g).to(torch.bfloat16),
        "c.alpha": torch.tensor(2.0),
        "d.idx": torch.arange(6, dtype=torch.int64).reshape(2, 3),
    }


def test_official_reader_reads_ours(tmp_path):
    tensors, meta = sample(), {"k": "v", "modelspec.title": "t"}
    save_file(tmp_path / "x.safetensors", tensors, meta)
    loaded = load_file(str(tmp_path / "x.safetensors"))
    assert loaded.keys() == tensors.keys()
    for k, v in tensors.items():
        assert loaded[k].dtype == v.dtype and torch.equal(loaded[k], v)
    with safe_open(str(tmp_path / "x.safetensors"), "pt") as f:
        assert f.metadata() == meta


def test_bytes_are_deterministic_and_header_aligned(tmp_path):
    save_file(tmp_path / "1.safetensors", sample(), {"b": "2", "a": "1"})
    save_file(tmp_path / "2.safetensors", dict(reversed(list(sample().items()))), {"a": "1", "b": "2"})
    one = (tmp_path / "1.safetensors").read_bytes()
    assert one == (tmp_path / "2.safetensors").read_bytes()
    (n,) = struct.unpack("<Q", one[:8])
    assert n % 8 == 0


def test_we_read_official_files(tmp_path):
    official_save(sample(), str(tmp_path / "o.safetensors"), metadata={"x": "y"})
    infos, meta = read_header(tmp_path / "o.safetensors")
    assert set(infos) == set(sample()) and meta == {"x": "y"}


@pytest.mark.parametrize("cut", [3, 20, -5])
def test_truncated_and_corrupt_headers(tmp_path, cut):
    save_file(tmp_path / "x.safetensors", sample())
    data = (tmp_path / "x.safetensors").read_bytes()
    (tmp_path / "bad.safetensors").write_bytes(data[:cut])
    with pytest.raises(FileFormatError) as info:
        read_header(tmp_path / "bad.safetensors")
    assert "bad.safetensors" in str(info.value)
    (tmp_path / "junk.safetensors").write_bytes(struct.pack("<Q", 4) + b"{{{{")
    with pytest.raises(FileFormatError, match="not valid JSON"):
        read_header(tmp_path / "junk.safetensors")


def test_failed_stream_leaves_nothing(tmp_path):
    specs = [TensorSpec("a", torch.float32, (2,)), TensorSpec("b", torch.float32, (2,))]
    with pytest.raises(RuntimeError):
        with StreamingWriter(tmp_path / "out.safetensors", specs) as w:
            w.write("a", torch.zeros(2))
            raise RuntimeError("interrupted")
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(OutputPathError, match="does not exist"):
        save_file(tmp_path / "missing" / "x.safetensors", sample())
