"""Turning what a user passes as `config` into the JSON text the C++ parser validates."""
import json
import os

from . import _zeal
from ._zeal import ConfigError


def load_config(config=None, args=None, config_params=None):
    """Returns the config as a dict. Accepts a path, a JSON string, a dict, or (as DeepSpeed
    does) an argparse namespace whose `deepspeed_config` names the file."""
    if config is None:
        config = config_params
    if config is None and args is not None:
        config = getattr(args, "deepspeed_config", None) or getattr(args, "zeal_config", None)
    if config is None:
        raise ConfigError("no config given: pass config= (a path, a JSON string or a dict)")
    if isinstance(config, dict):
        return config
    if isinstance(config, (str, os.PathLike)):
        text = str(config)
        if os.path.isfile(text):
            with open(text, "rb") as f:  # bytes: ill-formed UTF-8 is the parser's ConfigError, with its offset
                data = f.read()
            try:
                return _parse(data)
            except ConfigError as e:
                raise ConfigError(f"config file '{text}': {e}") from None
        if text.lstrip().startswith("{"):
            return _parse(text.encode("utf-8", "surrogatepass"))
        raise ConfigError(f"config file '{text}' does not exist")
    raise ConfigError(f"config must be a path, a JSON string or a dict, got {type(config).__name__}")


def _parse(data: bytes) -> dict:
    """The C++ parser (Config::parse_text) judges the bytes first: duplicate keys, NaN, NUL bytes,
    ill-formed UTF-8 and nesting are refused there with the key path and byte offset; only text it
    accepted (bounded depth) reaches Python's json module."""
    _zeal.check_config_text(data)
    return json.loads(data.decode("utf-8"))


def to_json(config: dict) -> str:
    try:
        return json.dumps(config)  # NaN/Infinity pass through: the C++ parser names their key
    except RecursionError:
        raise ConfigError(f"config is nested deeper than {_zeal.MAX_JSON_DEPTH} levels") from None
    except (TypeError, ValueError) as e:
        raise ConfigError(f"config holds a value that is not JSON: {e}") from None
