"""Reading Zeal checkpoints outside training: the consolidated fp32 weights.

The format is described in include/zeal/checkpoint/checkpoint.h and docs/checkpoints.md: a
directory per tag with a JSON manifest and one safetensors shard per rank; nothing is pickled.
"""
import argparse
import json
import sys

from . import _zeal


def _resolve(checkpoint_dir, tag=None):
    """A tag directory as is; a save_dir (holding `latest`) resolved to its newest tag, or `tag`."""
    import os

    if tag is None and os.path.exists(os.path.join(checkpoint_dir, "zeal_checkpoint.json")):
        return checkpoint_dir
    return _zeal.resolve_checkpoint(checkpoint_dir, tag or "")


def pipeline_parts(checkpoint_dir, tag=None):
    """A pipeline checkpoint's stage parts (zeal.pipe saves one per stage), given its tag directory
    or a save_dir (its `latest` tag, or `tag`); None when it is not one."""
    import os

    root = checkpoint_dir if tag is None else os.path.join(checkpoint_dir, tag)
    latest = os.path.join(checkpoint_dir, "latest")
    if tag is None and not os.path.exists(os.path.join(root, "pipeline.json")) and os.path.exists(latest):
        with open(latest) as f:
            root = os.path.join(checkpoint_dir, f.read().strip())
    meta = os.path.join(root, "pipeline.json")
    if not os.path.exists(meta):
        return None
    with open(meta) as f:
        return [os.path.join(root, part) for part in json.load(f)["parts"]]


def _parts(checkpoint_dir, tag=None):
    """The directories of one checkpoint: itself, or a pipeline checkpoint's stage parts."""
    return pipeline_parts(checkpoint_dir, tag) or [_resolve(checkpoint_dir, tag)]


def to_fp32_state_dict(checkpoint_dir, tag=None):
    """{parameter name: full fp32 tensor}, assembled from every rank's shard (any world size, any
    stage; every stage of a pipeline checkpoint)."""
    out = {}
    for path in _parts(checkpoint_dir, tag):
        for name in _zeal.checkpoint_parameter_names(path):
            if name not in out:
                out[name] = _zeal.checkpoint_read_parameter(path, name)
    return out


def to_fp32_file(checkpoint_dir, out_path, tag=None):
    """Writes the consolidated fp32 weights as one safetensors file, streaming one parameter at a time."""
    _zeal.checkpoint_parts_to_fp32(_parts(checkpoint_dir, tag), str(out_path))


def client_state(checkpoint_dir, tag=None):
    with open(f"{_resolve(checkpoint_dir, tag)}/zeal_checkpoint.json") as f:
        return json.load(f)["client_state"]


def main(argv=None):
    ap = argparse.ArgumentParser(prog="zeal-to-fp32",
                                 description="Consolidate a Zeal checkpoint into one fp32 safetensors file.")
    ap.add_argument("checkpoint_dir", help="a save_dir (its `latest` tag is used) or one tag's directory")
    ap.add_argument("output", help="the .safetensors file to write")
    ap.add_argument("--tag", default=None, help="the tag to convert instead of `latest`")
    args = ap.parse_args(argv)
    try:
        to_fp32_file(args.checkpoint_dir, args.output, args.tag)
    except _zeal.Error as e:
        print(f"zeal-to-fp32: {e}", file=sys.stderr)
        return 1
    print(f"zeal-to-fp32: wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
