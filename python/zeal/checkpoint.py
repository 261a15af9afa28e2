"""Reading Zeal checkpoints outside training: the consolidated fp32 weights.

The format is described in include/zeal/checkpoint/checkpoint.h and docs/architecture.md (Checkpoints): a
directory per tag with a JSON manifest and one safetensors shard per rank, or, for pipeline and
tensor parallelism, one such directory per part and a parts.json naming them; nothing is pickled.
"""
import argparse
import json
import sys

import torch

from . import _zeal


def _resolve(checkpoint_dir, tag=None):
    """A tag directory as is; a save_dir (holding `latest`) resolved to its newest tag, or `tag`."""
    import os

    if tag is None and os.path.exists(os.path.join(checkpoint_dir, "zeal_checkpoint.json")):
        return checkpoint_dir
    return _zeal.resolve_checkpoint(checkpoint_dir, tag or "")


PARTS_FILE = _zeal.CHECKPOINT_PARTS_FILE  # "parts.json"


def checkpoint_parts(checkpoint_dir, tag=None):
    """The part directories of a checkpoint saved in parts (pipeline stages, tensor ranks: see
    save_parts), given its tag directory or a save_dir (its `latest` tag, or `tag`); None when it
    is a checkpoint of one part."""
    import os

    root = checkpoint_dir if tag is None else os.path.join(checkpoint_dir, tag)
    latest = os.path.join(checkpoint_dir, "latest")
    if tag is None and not os.path.exists(os.path.join(root, PARTS_FILE)) and os.path.lexists(latest):
        root = os.path.join(checkpoint_dir, _zeal.read_latest(str(checkpoint_dir)))
    meta = os.path.join(root, PARTS_FILE)
    if not os.path.lexists(meta):
        return None
    doc = json.loads(_zeal.read_sealed_json(meta))  # checksum verified (Note [Checkpoint integrity])
    parts = doc.get("parts") if isinstance(doc, dict) else None
    if not isinstance(parts, list) or not parts or not all(
            isinstance(p, str) and p and "/" not in p and not p.startswith(".") for p in parts):
        raise _zeal.CheckpointError(f"{meta} is invalid: 'parts' must be a list of part directory names")
    return [os.path.join(root, part) for part in parts]


def checkpoint_location(checkpoint_dir, tag=None):
    """(the tag directory, the directories of its parts): a checkpoint in parts has its parts, one
    of one part is its own only part. Paths may be str or os.PathLike."""
    import os

    checkpoint_dir = os.fspath(checkpoint_dir)
    tag = None if tag is None else str(tag)
    parts = checkpoint_parts(checkpoint_dir, tag)
    if parts:
        return os.path.dirname(parts[0]), parts
    root = _resolve(checkpoint_dir, tag)
    return root, [root]


def parts_of(checkpoint_dir, tag=None):
    """The directories of one checkpoint: its parts, or the tag directory itself."""
    return checkpoint_location(checkpoint_dir, tag)[1]


def save_parts(core, world, save_dir, tag, part, parts, layout, client_json, extra, save_latest):
    """Every rank of `world` calls it. A checkpoint in parts: each part is one engine's checkpoint
    (the ranks of its data group save it together), all under <save_dir>/.tmp-<tag>; when every
    part is complete rank 0 writes parts.json there, renames the directory to <tag> and then moves
    `latest` (Note [Atomic checkpoints]; the protocol is the engine's, checkpoint/publish.h). A
    failure on any rank fails every rank."""
    return core.save_checkpoint_part(world, str(save_dir), str(tag), part, list(parts), json.dumps(layout),
                                     client_json, extra, save_latest)


def to_fp32_state_dict(checkpoint_dir, tag=None):
    """{parameter name: full fp32 tensor}, assembled from every rank's shard (any world size, any
    stage; every part of a checkpoint in parts, tensor-parallel slices joined)."""
    return dict(_zeal.checkpoint_read_parameters(parts_of(checkpoint_dir, tag)))


def to_fp32_file(checkpoint_dir, out_path, tag=None):
    """Writes the consolidated fp32 weights as one safetensors file, streaming one parameter at a time."""
    _zeal.checkpoint_parts_to_fp32(parts_of(checkpoint_dir, tag), str(out_path))


def client_state(checkpoint_dir, tag=None):
    return json.loads(_zeal.read_sealed_json(f"{parts_of(checkpoint_dir, tag)[0]}/zeal_checkpoint.json"))["client_state"]


def clone_tensors_for_torch_save(item, device=torch.device("cpu")):
    """DeepSpeed's: a copy of `item` (tensors in any nesting of lists, tuples and dicts) with every
    tensor detached and copied to `device`, so torch.save writes only their own bytes."""
    if torch.is_tensor(item):
        return item.detach().clone() if item.device == torch.device(device) else item.detach().to(device)
    if isinstance(item, (list, tuple)):
        return type(item)(clone_tensors_for_torch_save(v, device) for v in item)
    if isinstance(item, dict):
        return type(item)((k, clone_tensors_for_torch_save(v, device)) for k, v in item.items())
    return item


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
