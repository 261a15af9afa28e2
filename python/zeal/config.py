"""Turning what a user passes as `config` into the JSON text the C++ parser validates."""
import json
import os

from . import _zeal
from ._zeal import ConfigError


def add_config_arguments(parser):
    """DeepSpeed's command-line arguments, in a group "DeepSpeed": --deepspeed, --deepspeed_config,
    and the deprecated --deepscale, --deepscale_config. Returns the parser."""
    group = parser.add_argument_group("DeepSpeed", "DeepSpeed configurations")
    group.add_argument("--deepspeed", default=False, action="store_true",
                       help="Enable DeepSpeed (helper flag for user code, no impact on DeepSpeed backend)")
    group.add_argument("--deepspeed_config", default=None, type=str, help="DeepSpeed json configuration file.")
    group.add_argument("--deepscale", default=False, action="store_true",
                       help="Deprecated enable DeepSpeed (helper flag for user code, no impact on DeepSpeed backend)")
    group.add_argument("--deepscale_config", default=None, type=str, help="Deprecated DeepSpeed json configuration file.")
    return parser


def load_config(config=None, args=None, config_params=None):
    """Returns the config as a dict, from DeepSpeed's sources in DeepSpeed's order: config=, else
    config_params=, else args.deepspeed_config (or the deprecated args.deepscale_config). A config
    is a dict, a path to a JSON or hjson file, a JSON string, or a base64-encoded JSON string."""
    from_args = None
    if args is not None:
        ds, legacy = getattr(args, "deepspeed_config", None), getattr(args, "deepscale_config", None)
        if ds is not None and legacy is not None:
            raise ConfigError("args.deepspeed_config and the deprecated args.deepscale_config are both set; keep one")
        from_args = ds if ds is not None else legacy
        if from_args is None:
            from_args = getattr(args, "zeal_config", None)
    if config is None:
        config = config_params
    if config is not None and from_args is not None:
        raise ConfigError(f"a config was given twice: config= and args.deepspeed_config ({from_args!r}); keep one")
    if config is None:
        config = from_args
    if config is None:
        raise ConfigError("no config given: pass config= (a dict, a path, a JSON string or base64 JSON), "
                          "config_params=, or args with --deepspeed_config")
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
        decoded = _base64(text)
        if decoded is not None:
            try:
                return _parse(decoded)
            except ConfigError as e:
                raise ConfigError(f"config (a base64 string): {e}") from None
        raise ConfigError(f"config file '{text}' does not exist (and the string is not base64-encoded JSON)")
    raise ConfigError(f"config must be a dict, a path or a JSON string, got {type(config).__name__}")


def _base64(text):
    import base64
    import binascii

    try:
        data = base64.b64decode(text.strip(), validate=True)
    except (binascii.Error, ValueError):
        return None
    return data if data.lstrip().startswith(b"{") else None


def _parse(data: bytes) -> dict:
    """The C++ parser (Config::parse_text) judges the bytes: JSON as DeepSpeed reads its config files
    (with hjson): comments and trailing commas allowed, Infinity and NaN as numbers; duplicate keys,
    NUL bytes, ill-formed UTF-8 and nesting are refused there with the key path and byte offset. It
    returns the text as strict JSON, which Python's json module then reads."""
    return json.loads(_zeal.normalize_config_text(data))


def to_json(config: dict) -> str:
    try:
        return json.dumps(config)  # NaN/Infinity pass through: the C++ parser names their key
    except RecursionError:
        raise ConfigError(f"config is nested deeper than {_zeal.MAX_JSON_DEPTH} levels") from None
    except (TypeError, ValueError) as e:
        raise ConfigError(f"config holds a value that is not JSON: {e}") from None
