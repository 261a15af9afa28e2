"""What each rank runs under the zeal launcher: set the torchrun-style variables from mpirun's,
run the user's script as __main__, and report a failure with this rank's number."""
import os
import runpy
import sys
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


def _fail(code):
    sys.stdout.flush()
    print(f"{FAILURE_MARKER} rank {os.environ['RANK']} exit code {code}", file=sys.stderr, flush=True)
    os._exit(code)


def main():
    if len(sys.argv) < 2:
        print("usage: python -m zeal._rank script.py [args]", file=sys.stderr)
        sys.exit(2)
    _export_rank_variables()
    script = sys.argv[1]
    sys.argv = sys.argv[1:]
    sys.path.insert(0, os.path.dirname(os.path.abspath(script)))
    try:
        runpy.run_path(script, run_name="__main__")
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        if code != 0:
            if not isinstance(e.code, int):
                print(e.code, file=sys.stderr)
            _fail(code)
    except BaseException:  # noqa: B902 - any failure of the user's script is this rank's failure
        traceback.print_exc()
        _fail(1)
    _shutdown()


def _shutdown():
    zeal = sys.modules.get("zeal")
    if zeal is not None:
        zeal._zeal.shutdown()


if __name__ == "__main__":
    main()
