"""bench/gpu_check.py on a machine without CUDA: one sentence that says why, exit status 1, nothing written."""
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import backbones  # noqa: E402
import gpu_check  # noqa: E402


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is usable here: the check itself would run")
def test_without_cuda_it_says_why_in_one_sentence_and_exits_1(tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        gpu_check.main(["--out-dir", str(tmp_path / "out"), "--work-dir", str(tmp_path / "work")])
    message = exit_info.value.code
    assert isinstance(message, str)  # sys.exit(text): the interpreter prints it and exits with status 1
    assert message.startswith("error: gpu_check needs a CUDA GPU, but ")
    assert backbones.cuda_problem() in message and "--device cpu" in message
    assert "\n" not in message and not list(tmp_path.iterdir())
