"""A config parser that no input can crash or stall (Config::parse_text, zeal/core/json.h): each
refusal is a ConfigError naming a key path or a byte offset, and any input is answered quickly.
The fuzz test mutates the shipped configs with a fixed seed."""
import json
import random
import time
from pathlib import Path

import pytest

import zeal
from zeal import _zeal
from zeal.config import load_config, to_json

CONFIGS = sorted((Path(__file__).resolve().parents[2] / "configs").glob("*.json"))


def check(data: bytes):
    """The whole Python path: bytes parsed strictly, then validated."""
    try:
        _zeal.check_config_text(data)
        _zeal.validate_config(to_json(json.loads(data.decode("utf-8"))))
        return None
    except zeal.ConfigError as e:
        return str(e)


@pytest.mark.parametrize("data,words", [
    (b'{"train_batch_size": 4, "train_batch_size": 8}', ["'train_batch_size' appears twice"]),
    (b'{"zero_optimization": {"stage": 1, "stage": 2}}', ["'zero_optimization.stage' appears twice"]),
    (b'{"optimizer": {"type": "Adam", "params": {"lr": NaN}}}', ["byte", "optimizer.params.lr", "NaN"]),
    (b'{"train_batch_size": Infinity}', ["train_batch_size", "Infinity"]),
    (b'{"train_batch_size": 4}\x00{"x": 1}', ["byte 23", "NUL"]),
    (b'{"train_batch_size": 4, "x\xff": 1}', ["byte", "UTF-8"]),
    (b'{"a": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", ["nested deeper than"]),
    (b'{"zero_optimization": {"reduce_bucket_size": 9.2e18}}', None),
    (b'{"zero_optimization": {"reduce_bucket_size": 9.3e18}}', ["9223372036854775807"]),
])
def test_hostile_inputs_are_config_errors_naming_where(data, words):
    message = check(data)
    if words is None:
        assert message is None or "reduce_bucket_size" not in message, message
        return
    assert message is not None
    for w in words:
        assert w in message, message


def test_file_with_invalid_utf8_is_a_config_error_not_unicode_error(tmp_path):
    path = tmp_path / "ds.json"
    path.write_bytes(b'{"train_batch_size": 4, "\xc3\x28": 1}')
    with pytest.raises(zeal.ConfigError, match="ds.json.*byte"):
        load_config(str(path))


def test_deep_python_dict_is_a_config_error():
    deep = {}
    node = deep
    for _ in range(5000):
        node["a"] = {}
        node = node["a"]
    with pytest.raises(zeal.ConfigError, match="nested deeper"):
        to_json(deep)


def test_ten_megabyte_unknown_key_answers_in_under_a_second():
    start = time.monotonic()
    # Inside a section (where unknown keys are errors, as in DeepSpeed's checked sections).
    message = check(b'{"zero_optimization": {"' + b"k" * 10_000_000 + b'": 1}}')
    assert time.monotonic() - start < 1.0
    assert "unknown config key" in message and "10000000 bytes" in message


def test_fuzzed_shipped_configs_never_crash_or_hang():
    rng = random.Random(1234)
    seeds = [p.read_bytes() for p in CONFIGS]
    assert seeds
    counts = {"accepted": 0, "rejected": 0}
    start = time.monotonic()
    for i in range(400):
        data = bytearray(rng.choice(seeds))
        for _ in range(rng.randint(1, 4)):
            kind = rng.randrange(5)
            pos = rng.randrange(len(data) + 1)
            if kind == 0 and data:
                data[min(pos, len(data) - 1)] = rng.randrange(256)
            elif kind == 1:
                data[pos:pos] = rng.choice([b"{", b"[", b"]", b"}", b",", b'"', b"\x00", b"NaN", b"1e999",
                                            b"-1", b'"stage": 3,', b"\xff", b"9" * 30])
            elif kind == 2 and data:
                del data[pos:pos + rng.randint(1, 8)]
            elif kind == 3:
                data[pos:pos] = b"[" * rng.randint(1, 300)
            else:
                cut = rng.randrange(len(data) + 1)
                data = data[:cut] + data[cut:cut + 40] + data[cut:]
        t = time.monotonic()
        message = check(bytes(data))
        assert time.monotonic() - t < 1.0, i
        if message is None:
            counts["accepted"] += 1
        else:
            counts["rejected"] += 1
            # Every rejection says where: a key path or a byte offset.
            assert "'" in message or "byte" in message, message
    print(f"fuzz: {counts} in {time.monotonic() - start:.1f}s")
    assert counts["rejected"] > 0


def test_unknown_top_level_key_is_ignored_with_a_warning_unless_a_typo(capfd):
    # DeepSpeed ignores keys it does not know at the top level; Zeal does too, loudly, and a key
    # that looks like a misspelt one is still an error.
    assert check(b'{"train_batch_size": 4, "_comment": "from LLaMA-Factory", "cuda_visible_devices": "0"}') is None
    assert "'_comment' is not a DeepSpeed or Zeal key; ignored" in capfd.readouterr().err
    assert "did you mean 'gradient_clipping'" in check(b'{"train_batch_size": 4, "gradient_cliping": 1.0}')


def test_hjson_comments_trailing_commas_and_infinity_as_deepspeed_reads_files(tmp_path):
    path = tmp_path / "ds.json"
    path.write_bytes(b'# a comment\n{\n  "train_batch_size": 8, // eight\n  /* block */ "steps_per_print": Infinity,\n'
                     b'  "zero_optimization": {"stage": 1,},\n}\n')
    cfg = load_config(str(path))
    assert cfg == {"train_batch_size": 8, "steps_per_print": float("inf"), "zero_optimization": {"stage": 1}}
    assert zeal._zeal.validate_config(json.dumps(cfg)).steps_per_print == 2**63 - 1  # never prints
    # Byte offsets still point into the file as written.
    path.write_bytes(b'{"train_batch_size": 8, // c\n "x": tru}')
    with pytest.raises(zeal.ConfigError, match="byte 3[4-9]"):
        load_config(str(path))


def test_base64_and_legacy_argument_sources():
    import argparse
    import base64

    text = base64.b64encode(b'{"train_batch_size": 16}').decode()
    assert load_config(text) == {"train_batch_size": 16}
    parser = zeal.add_config_arguments(argparse.ArgumentParser())
    args = parser.parse_args(["--deepscale_config", text])
    assert args.deepspeed is False and load_config(args=args) == {"train_batch_size": 16}
    assert load_config(config_params={"train_batch_size": 2}) == {"train_batch_size": 2}
    args = parser.parse_args(["--deepspeed_config", text, "--deepscale_config", text])
    with pytest.raises(zeal.ConfigError, match="deepscale_config"):
        load_config(args=args)
    with pytest.raises(zeal.ConfigError, match="given twice"):
        load_config({"train_batch_size": 2}, args=parser.parse_args(["--deepspeed_config", text]))
