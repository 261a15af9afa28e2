"""What each rank runs under the zeal launcher.

It sets the torchrun-style variables from mpirun's, prefixes every line this process writes to
stdout or stderr with "[rankN]: " (at the file-descriptor level, so C++ and child-process output
is prefixed too), runs the user's script as __main__, and on failure writes one marker line that
the launcher turns into "rank N failed with exit code C".
"""
import os
import runpy
import sys
import threading
import traceback

FAILURE_MARKER = "ZEAL-RANK-FAILED"


def _export_rank_variables():
    env = os.environ
    env["RANK"] = env.get("OMPI_COMM_WORLD_RANK", env.get("RANK", "0"))
    env["WORLD_SIZE"] = env.get("OMPI_COMM_WORLD_SIZE", env.get("WORLD_SIZE", "1"))
    env["LOCAL_RANK"] = env.get("OMPI_COMM_WORLD_LOCAL_RANK", env.get("LOCAL_RANK", "0"))
    env["LOCAL_WORLD_SIZE"] = env.get("OMPI_COMM_WORLD_LOCAL_SIZE", env.get("LOCAL_WORLD_SIZE", "1"))
    env.setdefault("MASTER_ADDR", "127.0.0.1")
    env.setdefault("MASTER_PORT", "29500")


class _PrefixedFd:
    """Points fd at a pipe whose lines a thread copies, prefixed, to the original target."""

    def __init__(self, fd, prefix):
        self.fd = fd
        self.real = os.dup(fd)
        read_end, write_end = os.pipe()
        os.dup2(write_end, fd)
        os.close(write_end)
        self.thread = threading.Thread(target=self._pump, args=(read_end, prefix.encode()), daemon=True)
        self.thread.start()

    def _pump(self, read_end, prefix):
        with os.fdopen(read_end, "rb") as src:
            for line in src:
                os.write(self.real, prefix + line)

    def close(self):
        os.close(self.fd)  # the pump sees end of file once every writer is gone
        self.thread.join(timeout=5)

    def write_direct(self, text):
        os.write(self.real, text.encode())


def _finish(code, streams):
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except Exception:  # noqa: BLE001 - leaving anyway
        pass
    for s in streams:
        s.close()
    if code != 0:
        streams[1].write_direct(f"{FAILURE_MARKER} rank {os.environ['RANK']} exit code {code}\n")
    os._exit(code)


def main():
    if len(sys.argv) < 2:
        print("usage: python -m zeal._rank script.py [args]", file=sys.stderr)
        sys.exit(2)
    _export_rank_variables()
    prefix = f"[rank{os.environ['RANK']}]: "
    sys.stdout.flush()
    sys.stderr.flush()
    streams = [_PrefixedFd(1, prefix), _PrefixedFd(2, prefix)]
    script = sys.argv[1]
    sys.argv = sys.argv[1:]
    sys.path.insert(0, os.path.dirname(os.path.abspath(script)))
    code = 0
    try:
        runpy.run_path(script, run_name="__main__")
    except SystemExit as e:
        if isinstance(e.code, int) or e.code is None:
            code = e.code or 0
        else:
            print(e.code, file=sys.stderr)
            code = 1
    except BaseException:  # noqa: B902 - any failure of the user's script is this rank's failure
        traceback.print_exc()
        code = 1
    if code == 0:
        zeal = sys.modules.get("zeal")
        if zeal is not None:
            zeal._zeal.shutdown()
    _finish(code, streams)


if __name__ == "__main__":
    main()
