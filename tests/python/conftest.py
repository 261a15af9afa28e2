"""Helpers for multi-rank tests: ranks are real processes started by mpirun or the zeal launcher."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from zeal.launcher import local_mpi_env

HERE = Path(__file__).resolve().parent
RANKS = HERE / "ranks"
ROOT = HERE.parent.parent


def mpi_env():
    return local_mpi_env()


def run_mpi(num_ranks, script, *args, timeout=300, check=True):
    """Runs RANKS/script on num_ranks real processes under mpirun; returns the CompletedProcess."""
    cmd = [shutil.which("mpirun"), "--oversubscribe", "--bind-to", "none", "-np", str(num_ranks),
           sys.executable, str(RANKS / script), *map(str, args)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=mpi_env())
    if check and proc.returncode != 0:
        pytest.fail(f"{script} on {num_ranks} ranks failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def run_launcher(num_ranks, script, *args, timeout=300):
    cmd = [shutil.which("zeal"), "--num_procs", str(num_ranks), str(script), *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=mpi_env())


@pytest.fixture
def run_ranks():
    return run_mpi


# --- tiers ---------------------------------------------------------------------------------------
# The default tier (scripts/test) keeps the suite under 30 minutes on 2 cores; the slow tier
# (scripts/test --slow, run by CI after it) holds further layouts, hosts and stages of cases the
# default tier already runs once: tests marked @pytest.mark.slow, and these parametrisations.
SLOW = {
    *(f"test_pipeline.py::test_pipeline_checkpoint_moves_between_layouts[saved{i}-loaded{i}]" for i in range(2, 9)),
    *(f"test_tensor_parallel.py::test_checkpoints_move_between_tensor_parallel_sizes[loaded{i}]" for i in range(1, 6)),
    "test_launcher.py::test_two_hosts_two_ranks_each_train_like_one_host[ssh]",
    "test_launcher.py::test_two_hosts_two_ranks_each_train_like_one_host[pdsh]",
    "test_launcher.py::test_two_hosts_a_failing_rank_stops_every_host[pdsh]",
    "test_pipeline.py::test_pipeline_with_data_parallel_and_zero2_on_8_ranks",
    "test_pipeline.py::test_3d_pipeline_tensor_data[8-args1]",
    "test_pipeline.py::test_pipeline_checkpoint_moves_between_layouts[saved1-loaded1]",
    "test_pipeline.py::test_3d_pipeline_tensor_data[4-args2]",
    *(f"test_pipeline.py::test_pipeline_matches_torch[{p}]" for p in ("4-4-args6", "4-4-args10", "4-2-args5")),
    *(f"test_tensor_parallel.py::test_demo_gpt_tensor_parallel_variant_matches_the_full_gpt[{p}]"
      for p in ("4-4-args4", "4-4-args2")),
    *(f"test_tensor_parallel.py::test_tensor_parallel_matches_torch[{p}]" for p in ("4-2-args4", "4-2-args3")),
    "test_checkpoint.py::test_onebit_lamb_resumes_with_its_frozen_coefficients[6]",
    "test_checkpoint.py::test_zero_one_adam_resumes_with_its_intervals[6]",
    *(f"test_multirank.py::test_huggingface_llama_with_ulysses_equals_the_whole_sequence[{p}]"
      for p in ("2-args0", "4-args3")),
}


def pytest_addoption(parser):
    parser.addoption("--tier", choices=("default", "slow", "all"), default=os.environ.get("ZEAL_TEST_TIER", "default"),
                     help="default: the suite scripts/test runs; slow: only the slow tier; all: both")


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: runs in the slow tier (scripts/test --slow), not the default one")


def pytest_collection_modifyitems(config, items):
    tier = config.getoption("--tier")
    if tier == "all":
        return
    keep, drop = [], []
    for item in items:
        slow = item.get_closest_marker("slow") is not None or item.nodeid.rsplit("/", 1)[-1] in SLOW
        (keep if slow == (tier == "slow") else drop).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep
