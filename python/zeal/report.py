"""`zeal-report` (or `python -m zeal.report`): what a bug report needs, in one screen.

Versions (Zeal, torch, Python, the C++ compiler that built Zeal), what was compiled in (MPI and
its library, CUDA kernels and their architectures, NCCL, the CPU instruction set the optimizer
kernels use, an NVMe async I/O backend), the GPUs this process sees, and the MPI / NCCL / Zeal
environment variables in effect.
"""
import os
import platform
import shutil
import subprocess
import sys

ENV_PREFIXES = ("OMPI_", "PMIX_", "MPI", "NCCL_", "UCX_", "CUDA_VISIBLE_DEVICES", "ZEAL_", "MASTER_ADDR",
                "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "OMP_NUM_THREADS")


def gpus():
    """[(index, name, total memory in GiB)] through torch, else nvidia-smi; [] when none."""
    import torch

    if torch.cuda.is_available():
        return [(i, torch.cuda.get_device_name(i), torch.cuda.get_device_properties(i).total_memory / 2**30)
                for i in range(torch.cuda.device_count())]
    smi = shutil.which("nvidia-smi")
    if smi:
        try:
            out = subprocess.run([smi, "--query-gpu=index,name,memory.total", "--format=csv,noheader,nounits"],
                                 capture_output=True, text=True, timeout=20).stdout
            return [(int(i), n.strip(), float(m) / 1024) for i, n, m in
                    (line.split(",") for line in out.strip().splitlines() if line.count(",") == 2)]
        except (OSError, subprocess.SubprocessError, ValueError):
            pass
    return []


def collect():
    import torch

    import zeal

    info = zeal._zeal.build_info()
    rows = [
        ("zeal", f"{zeal.__version__} ({os.path.dirname(zeal.__file__)})"),
        ("torch", f"{torch.__version__} (CUDA {torch.version.cuda or 'none'})"),
        ("python", f"{platform.python_version()} ({sys.executable})"),
        ("platform", platform.platform()),
        ("compiler", info["compiler"]),
        ("MPI", info["mpi_library"] if info["with_mpi"] else "not built"),
        ("CUDA kernels", f"built, CUDA {info['cuda_version']}, {info['cuda_architectures']}" if info["with_cuda"]
         else "not built (nvcc was not found at build time)"),
        ("NCCL", info["nccl_version"]),
        ("CPU SIMD in use", f"{info['cpu_isa']} ({os.cpu_count()} CPUs, torch threads {torch.get_num_threads()})"),
        ("NVMe async I/O", "not built (offload to NVMe is not in this version)"),
    ]
    found = gpus()
    rows.append(("GPUs", "none visible" if not found else
                 "; ".join(f"{i}: {name}, {mem:.1f} GiB" for i, name, mem in found)))
    env = sorted((k, v) for k, v in os.environ.items() if k.startswith(ENV_PREFIXES))
    return rows, env


def main(argv=None):
    rows, env = collect()
    width = max(len(k) for k, _ in rows)
    print("Zeal report (paste this into a bug report)")
    for key, value in rows:
        print(f"  {key:<{width}}  {value}")
    print("environment (MPI, NCCL, UCX, Zeal, launch variables):")
    for key, value in env or [("(none set)", "")]:
        print(f"  {key}={value}" if value else f"  {key}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
