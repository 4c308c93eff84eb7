"""Bad targets give clear errors and leave files (and caches) intact."""
import shutil

import pytest

import specrt
from tests.tiny import make_tiny_model


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("err"), "llama", seed=9)


def test_missing_target_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="target not found"):
        specrt.Engine.from_pretrained(str(tmp_path / "no_such_model"))


def test_truncated_safetensors(tiny_dir, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(tiny_dir, bad)
    f = bad / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated"):
        specrt.Engine.from_pretrained(str(bad), device="cpu")
    assert f.stat().st_size == len(data) // 2  # the file is left as it was
    # the good copy still loads
    assert specrt.Engine.from_pretrained(str(tiny_dir), device="cpu").generate(
        "hi", specrt.SamplingParams(max_tokens=3, ignore_eos=True))[0].token_ids


def test_truncated_gguf(tmp_path, monkeypatch):
    from specrt.model.gguf_loader import default_gguf_path

    try:
        src = default_gguf_path()
    except Exception:
        pytest.skip("default GGUF not installed")
    monkeypatch.setenv("SPECRT_CACHE", str(tmp_path / "cache"))
    bad = tmp_path / "cut.gguf"
    with open(src, "rb") as fin, open(bad, "wb") as fout:
        fout.write(fin.read(5_000_000))
    with pytest.raises(ValueError, match="truncated|not a GGUF"):
        specrt.Engine.from_pretrained(str(bad), device="cpu")
    cache = tmp_path / "cache"
    assert not cache.exists() or not any(p.name.startswith("cut") for p in cache.iterdir())


def test_not_a_model_file(tmp_path):
    f = tmp_path / "weights.bin"
    f.write_bytes(b"\0" * 10)
    with pytest.raises(ValueError, match="HF model directory or a .gguf"):
        specrt.Engine.from_pretrained(str(f))


def test_unknown_drafter(tiny_dir):
    eng = specrt.Engine.from_pretrained(str(tiny_dir), device="cpu")
    with pytest.raises(ValueError, match="unknown drafter"):
        eng.generate("hi", drafter="nope")
