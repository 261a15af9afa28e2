"""Helpers for multi-rank tests: ranks are real processes started by mpirun or the zeal launcher."""
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
