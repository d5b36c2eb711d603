"""`loramerge demo` — the README's main job — runs, and its page references images that exist."""

import re
import subprocess
import sys

import loramerge


def test_demo_writes_a_page_whose_images_exist(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "loramerge", "demo", "--out", str(tmp_path / "demo"), "--samples", "1"],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    # our lines only: no library progress bars or notices
    assert proc.stderr.strip().splitlines() == ["tiny digit world: merging bold + slanted …"], proc.stderr
    page = tmp_path / "demo" / "index.html"
    assert str(page) in proc.stdout.replace("\n", "")
    html = page.read_text()
    images = re.findall(r'<img src="([^"]+)"', html)
    assert len(images) >= 10
    for name in images:
        data = (tmp_path / "demo" / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n", name
    for method in ("linear", "ties", "knots", "tsv", "iso_c"):
        merged = loramerge.load(tmp_path / "demo" / f"merged_{method}.safetensors")
        assert merged.arch == "sd1" and len(merged) > 0
    assert (tmp_path / "demo" / "fused_pipeline" / "model_index.json").is_file()
    assert not re.search(r"\bnan\b", html, re.IGNORECASE)  # "–" where a value does not apply
    for label in ("composite, own prompts", "switch, own prompts", "k-lora"):  # inference-time rows
        assert f"<b>compose: {label}" in html
