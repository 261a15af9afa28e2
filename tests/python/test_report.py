"""zeal-report prints what a bug report needs, from the build and the running process."""
import os
import shutil
import subprocess
import sys

import torch

import zeal


def test_zeal_report_names_versions_build_parts_gpus_and_environment():
    env = dict(os.environ, NCCL_DEBUG="WARN", OMPI_MCA_btl="self,vader", ZEAL_REPORT_PROBE="1")
    for cmd in ([shutil.which("zeal-report")], [sys.executable, "-m", "zeal.report"]):
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
        assert proc.returncode == 0, proc.stderr
        out = proc.stdout
        info = zeal._zeal.build_info()
        assert f"zeal             {zeal.__version__}" in out
        assert f"torch            {torch.__version__}" in out
        assert f"compiler         {info['compiler']}" in out and info["compiler"].split()[0] in ("GNU", "Clang")
        assert "MPI              Open MPI v" in out  # the library's own version line
        if info["with_cuda"]:
            assert "CUDA kernels     built, CUDA" in out and "sm_80 sm_90" in out
            assert f"NCCL             {info['nccl_version']}" in out and info["nccl_version"].count(".") == 2
        else:
            assert "CUDA kernels     not built" in out
        assert f"CPU SIMD in use  {zeal.optim.CPUAdam.isa()}" in out
        assert "NVMe async I/O" in out
        gpus = "none visible" if not torch.cuda.is_available() else torch.cuda.get_device_name(0)
        assert gpus in out
        for line in ("NCCL_DEBUG=WARN", "OMPI_MCA_btl=self,vader", "ZEAL_REPORT_PROBE=1"):
            assert f"  {line}" in out
