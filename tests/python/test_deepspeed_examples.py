"""The two DeepSpeed-style example scripts (examples/deepspeed_style/), written only against
DeepSpeed's public API with `import zeal as deepspeed`, run under the zeal launcher on 2 ranks:
they learn, and what they save loads back to the same results."""
import re

from conftest import ROOT, run_launcher

EXAMPLES = ROOT / "examples" / "deepspeed_style"
CONFIG = EXAMPLES / "ds_config.json"


def test_cifar_style_script_learns_and_resumes(tmp_path):
    proc = run_launcher(2, EXAMPLES / "cifar_style.py", "--deepspeed", "--deepspeed_config", CONFIG,
                        "--checkpoint_dir", tmp_path / "ckpt")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    before = float(re.search(r"before training: test loss ([\d.]+)", out).group(1))
    after, accuracy = map(float, re.search(r"after training: test loss ([\d.]+), accuracy ([\d.]+)", out).groups())
    loaded = float(re.search(r"loaded global_step64 \(epochs 4, step 64\): test loss ([\d.]+)", out).group(1))
    assert after < 0.8 * before and accuracy > 0.5
    assert loaded == after


import pytest


@pytest.mark.parametrize("ranks", [2, 4])
def test_pipeline_style_script_learns_and_resumes(tmp_path, ranks):
    # 4 ranks: 2 stages x 2 data-parallel, each data rank reading its own shard of training_data.
    proc = run_launcher(ranks, EXAMPLES / "pipeline_style.py", "--deepspeed_config", CONFIG,
                        "--pipeline-parallel-size", "2", "--checkpoint_dir", tmp_path / "ckpt")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    assert f"2 stages x {ranks // 2} data-parallel" in out
    first, last = map(float, re.search(r"first loss ([\d.]+), last loss ([\d.]+)", out).groups())
    assert last < 0.3 * first
    got, want = re.search(r"loaded at step 40: eval loss ([\d.]+) \(before saving ([\d.]+)\)", out).groups()
    assert got == want
