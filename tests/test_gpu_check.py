"""bench/gpu_check.py on a machine without CUDA: one sentence that says why, exit status 1, nothing written; and its
dry run (CPU against CPU), which must pass every strict check."""
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


def test_a_dry_run_on_the_cpu_passes_every_strict_check_and_times_both_methods(tmp_path):
    # CPU against CPU: the same images, and scores well inside the tolerances, so a check that fails here is a bug of
    # the script (e.g. the saved runs' image names no longer matching the data tree), not of a device
    result = gpu_check.main(["--device", "cpu", "--image-size", "64", "--n-images", "16",
                             "--out-dir", str(tmp_path / "out"), "--work-dir", str(tmp_path / "work")])
    assert result["passed"] and len(result["strict"]) == 7
    assert [r["result"] for r in result["strict"]].count("pass") == 6  # the 7th: trained twice, measured only
    assert "9 run folders" in result["strict"][0]["what"] and result["strict"][0]["value"] == "0 differ"
    timings = dict(result["timing"])
    fit = next(v for k, v in timings.items() if k.startswith("PatchCore wide_resnet50_2 64 px: fit s"))
    assert fit > 0 and (tmp_path / "out" / "gpu_check.md").is_file()
