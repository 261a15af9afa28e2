"""Turning what a user passes as `config` into the JSON text the C++ parser validates."""
import json
import os

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
            with open(text, encoding="utf-8") as f:
                try:
                    return json.load(f)
                except json.JSONDecodeError as e:
                    raise ConfigError(f"config file '{text}' is not valid JSON: {e}") from None
        if text.lstrip().startswith("{"):
            try:
                return json.loads(text)
            except json.JSONDecodeError as e:
                raise ConfigError(f"config string is not valid JSON: {e}") from None
        raise ConfigError(f"config file '{text}' does not exist")
    raise ConfigError(f"config must be a path, a JSON string or a dict, got {type(config).__name__}")


def to_json(config: dict) -> str:
    try:
        return json.dumps(config)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"config holds a value that is not JSON: {e}") from None
