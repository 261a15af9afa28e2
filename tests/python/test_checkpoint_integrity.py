"""Checkpoints that cannot load wrong values (Note [Checkpoint integrity]): every damaged, foreign
or edited file is refused with a CheckpointError naming it, before any value is copied. Two real
2-rank saves and one 1-rank save are made once; each case damages a copy in this process and reads
it back through the same reader the engine uses."""
import json
import os
import shutil
import signal
import struct
import sys

import pytest
import torch

from conftest import RANKS, run_mpi

sys.path.insert(0, str(RANKS))

import zeal  # noqa: E402
from zeal import _zeal  # noqa: E402


def _save(world, root, name):
    save_dir = root / name
    run_mpi(world, "ckpt_train.py", "--stage", "1", "--until", "2", "--save_at", "2", "--save_dir", save_dir,
            "--out", root / f"{name}.pt", timeout=180)
    return save_dir


@pytest.fixture(scope="module")
def saves(tmp_path_factory):
    root = tmp_path_factory.mktemp("integrity")
    return {"a": _save(2, root, "a"), "b": _save(2, root, "b"), "one": _save(1, root, "one")}


@pytest.fixture
def ckpt(saves, tmp_path):
    """A fresh copy of save a; returns its tag directory."""
    shutil.copytree(saves["a"], tmp_path / "a")
    return tmp_path / "a" / "global_step2"


def read(tag_dir):
    return _zeal.checkpoint_read_parameters([str(tag_dir)])


def refused(tag_dir, *words):
    with pytest.raises(zeal.CheckpointError) as info:
        read(tag_dir)
    message = str(info.value)
    for w in words:
        assert w in message, message
    return message


def manifest(tag_dir):
    return tag_dir / "zeal_checkpoint.json"


def reseal(tag_dir, edit):
    """An edit made by someone who also recomputed the checksum: the checks behind it must hold."""
    doc = json.loads(_zeal.read_sealed_json(str(manifest(tag_dir))))
    edit(doc)
    _zeal.write_sealed_json(str(manifest(tag_dir)), json.dumps(doc))


def header(path):
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8:8 + n]), data[8 + n:]


def write_header(path, head, body):
    text = json.dumps(head, separators=(",", ":")).encode()
    text += b" " * ((8 - len(text) % 8) % 8)
    path.write_bytes(struct.pack("<Q", len(text)) + text + body)


def test_intact_checkpoint_reads_and_equals_the_trained_weights(saves, ckpt):
    params = read(ckpt)
    trained = torch.load(saves["a"].parent / "a.pt")["params"]
    assert set(params) == set(trained)
    for name, want in trained.items():
        assert torch.equal(params[name].flatten(), want.flatten()), name


def test_one_changed_digit_in_the_manifest_is_refused(ckpt):
    # Shift rank 1's first fragment by one element, keeping the recorded checksum: still in bounds,
    # so format version 1 loaded wrong weights without an error.
    doc = json.loads(manifest(ckpt).read_text())
    doc["ranks"][1]["fragments"][0][3] += 1
    manifest(ckpt).write_text(json.dumps(doc, indent=1))
    refused(ckpt, "zeal_checkpoint.json", "fails its checksum")


def test_fragment_table_is_validated_whole(ckpt):
    # Behind the checksum: two fragments of one rank sharing local elements.
    def shift(doc):
        f = doc["ranks"][0]["fragments"][0]
        f[3] += 1  # rank 0's first fragment now overlaps its second in local elements
        doc["ranks"][0]["fragments"][0] = f
    reseal(ckpt, shift)
    refused(ckpt, "zeal_checkpoint.json", "overlap")


def test_uncovered_elements_are_refused(ckpt):
    def shrink(doc):
        f = doc["ranks"][1]["fragments"][-1]
        f[2] -= 1
    reseal(ckpt, shrink)
    refused(ckpt, "zeal_checkpoint.json", "partly covered")


def test_out_of_range_local_offsets_are_a_checkpoint_error(ckpt):
    def beyond(doc):
        f = doc["ranks"][1]["fragments"][-1]
        f[3] += 10_000  # past the end of the shard's tensors
    reseal(ckpt, beyond)
    refused(ckpt, "shard_r00001.safetensors", "of at least")


def test_shard_from_another_save_is_refused(saves, ckpt):
    shutil.copy(saves["b"] / "global_step2" / "shard_r00001.safetensors", ckpt / "shard_r00001.safetensors")
    refused(ckpt, "shard_r00001.safetensors", "belongs to save")


def test_rank0_shard_of_a_one_rank_save_is_refused(saves, ckpt):
    shutil.copy(saves["one"] / "global_step2" / "shard_r00000.safetensors", ckpt / "shard_r00000.safetensors")
    refused(ckpt, "shard_r00000.safetensors", "belongs to save")


def test_manifest_of_another_world_size_is_refused(saves, ckpt):
    shutil.copy(saves["one"] / "global_step2" / "zeal_checkpoint.json", manifest(ckpt))
    refused(ckpt, "shard_r00000.safetensors", "belongs to save")


def test_swapped_offsets_and_crcs_in_a_shard_header_are_refused(ckpt):
    shard = ckpt / "shard_r00001.safetensors"
    head, body = header(shard)
    names = [n for n in head if n != "__metadata__"][:2]
    a, b = names
    head[a]["data_offsets"], head[b]["data_offsets"] = head[b]["data_offsets"], head[a]["data_offsets"]
    meta = head["__metadata__"]
    meta[f"crc32:{a}"], meta[f"crc32:{b}"] = meta[f"crc32:{b}"], meta[f"crc32:{a}"]
    write_header(shard, head, body)
    message = refused(ckpt, "shard_r00001.safetensors")
    assert "header differs" in message or "bytes; the manifest recorded" in message, message


def test_swapped_offsets_alone_fail_the_range_keyed_checksum(ckpt):
    # Even where the header digest is not consulted (a file read on its own), a CRC belongs to a range.
    shard = ckpt / "shard_r00001.safetensors"
    head, body = header(shard)
    a, b = [n for n in head if n != "__metadata__"][:2]
    head[a]["data_offsets"], head[b]["data_offsets"] = head[b]["data_offsets"], head[a]["data_offsets"]
    write_header(shard, head, body)
    with pytest.raises(zeal.CheckpointError, match="checksum was taken at"):
        _zeal.read_safetensors(str(shard))


@pytest.mark.parametrize("key,value,words", [
    ("global_steps", -5, "'engine.global_steps' must be an integer >= 0"),
    ("scheduler_iteration", 10**12, "'engine.scheduler_iteration'"),
    ("optimizer_steps", 10**12, "'engine.optimizer_steps'"),
    ("skipped_steps", 3, "'engine.skipped_steps' (3) exceeds"),
])
def test_engine_counters_are_validated(ckpt, key, value, words):
    reseal(ckpt, lambda doc: doc["engine"].__setitem__(key, value))
    refused(ckpt, "zeal_checkpoint.json", words)


def test_missing_manifest_key_names_file_and_key(ckpt):
    reseal(ckpt, lambda doc: doc.pop("optimizer_state"))
    refused(ckpt, "zeal_checkpoint.json", "optimizer_state")


def test_deeply_nested_client_state_is_refused_not_a_crash(ckpt):
    text = manifest(ckpt).read_text()
    depth = 100_000
    # Valid JSON (the manifest gains a key "old"), nested 100,000 deep.
    manifest(ckpt).write_text(text.replace('"client_state":', '"client_state": ' + "[" * depth + "]" * depth
                                           + ', "old":', 1))
    refused(ckpt, "zeal_checkpoint.json", "nested deeper than")


def test_a_fifo_in_place_of_a_shard_or_manifest_does_not_block(ckpt):
    def alarm(*_):
        raise RuntimeError("the load blocked on a FIFO")
    old = signal.signal(signal.SIGALRM, alarm)
    signal.alarm(20)
    try:
        shard = ckpt / "shard_r00001.safetensors"
        shard.unlink()
        os.mkfifo(shard)
        refused(ckpt, "shard_r00001.safetensors", "FIFO")
        manifest(ckpt).unlink()
        os.mkfifo(manifest(ckpt))
        refused(ckpt, "zeal_checkpoint.json", "FIFO")
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def test_bad_latest_is_a_checkpoint_error(ckpt):
    save_dir = ckpt.parent
    (save_dir / "latest").write_bytes(b"\xff\xfeglobal\x00")
    with pytest.raises(zeal.CheckpointError, match="latest"):
        zeal.checkpoint.parts_of(str(save_dir))
    (save_dir / "latest").unlink()
    (save_dir / "latest").mkdir()
    with pytest.raises(zeal.CheckpointError, match="is a directory"):
        zeal.checkpoint.parts_of(str(save_dir))


def test_newer_format_version_says_which_is_needed(ckpt):
    reseal(ckpt, lambda doc: doc.__setitem__("version", 3))
    refused(ckpt, "format version 3", "newer Zeal")


def test_version1_checkpoints_still_load(ckpt):
    # Today's format before this change: no checksum, save id, part or seals; plain CRC values.
    want = read(ckpt)
    doc = json.loads(_zeal.read_sealed_json(str(manifest(ckpt))))
    for key in ("save_id", "part", "extra"):
        doc.pop(key)
    doc["version"] = 1
    for r in doc["ranks"]:
        r.pop("seal", None)
    manifest(ckpt).write_text(json.dumps(doc, indent=1))
    for shard in ckpt.glob("*.safetensors"):
        head, body = header(shard)
        meta = head["__metadata__"]
        head["__metadata__"] = {k: (v.rsplit(":", 1)[1] if k.startswith("crc32:") else v)
                                for k, v in meta.items() if k in ("rank", "format") or k.startswith("crc32:")}
        write_header(shard, head, body)
    got = read(ckpt)
    assert all(torch.equal(got[n], want[n]) for n in want)


def test_save_dir_none_or_empty_is_a_value_error_and_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    model = torch.nn.Linear(4, 2)
    engine, *_ = zeal.initialize(model=model, config={"train_batch_size": 1,
                                                      "optimizer": {"type": "Adam", "params": {"lr": 1e-3}}})
    for bad in (None, ""):
        with pytest.raises(ValueError, match="save_dir"):
            engine.save_checkpoint(bad)
    assert list(tmp_path.iterdir()) == []
