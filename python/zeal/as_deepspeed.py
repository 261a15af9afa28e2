"""`import deepspeed` as Zeal, by explicit opt-in: `zeal-deepspeed install` writes a two-line
`deepspeed` package and a `deepspeed-<version>+zeal.<zeal version>.dist-info` into a site
directory, so libraries that check for and import DeepSpeed (transformers' Trainer, Accelerate)
find Zeal. `zeal-deepspeed uninstall` removes exactly those files; `zeal-deepspeed status` says
what `import deepspeed` resolves to.

    zeal-deepspeed install                 # into this interpreter's site-packages
    zeal-deepspeed install --target DIR    # into DIR (put it on PYTHONPATH)
    zeal-deepspeed uninstall [--target DIR]

The shim refuses to shadow a real DeepSpeed installation unless --force, and never overwrites
another distribution's files. Precedents: pymysql.install_as_MySQLdb(), sklearnex's patch_sklearn().

Which DeepSpeed module path holds which Zeal object is written once, in MODULES below; the shim
binds it (bind) and the docs' compatibility test reads it.
"""
import argparse
import importlib
import importlib.machinery
import importlib.metadata
import shutil
import sys
import sysconfig
import types
from pathlib import Path

# The DeepSpeed release whose API this Zeal follows: the version the shim's metadata claims, with
# a local "+zeal.<version>" part that says plainly what it is.
DEEPSPEED_API_VERSION = "0.19.8"
MARKER = "zeal-deepspeed"  # the dist-info's INSTALLER: how uninstall tells our files from others'


def _version():
    from . import __version__

    return f"{DEEPSPEED_API_VERSION}+zeal.{__version__}"


# DeepSpeed module path -> a Zeal module (the whole module stands in for it), "zeal.module:*" (a
# module of its own holding that module's public names: needed where DeepSpeed's path has
# submodules of its own), or a table of names -> "zeal.module:attribute" (a module of those names).
MODULES = {
    "deepspeed.comm": "zeal.comm",
    "deepspeed.accelerator": "zeal.accelerator",
    "deepspeed.zero": "zeal.zero",
    "deepspeed.utils": "zeal.utils",
    "deepspeed.utils.groups": "zeal.utils.groups",
    "deepspeed.moe": "zeal.moe",
    "deepspeed.moe.layer": "zeal.moe.layer",
    "deepspeed.moe.experts": "zeal.moe.experts",
    "deepspeed.moe.sharded_moe": "zeal.moe.sharded_moe",
    "deepspeed.moe.utils": "zeal.moe.utils",
    "deepspeed.pipe": "zeal.pipe",
    "deepspeed.sequence": "zeal.sequence:*",
    "deepspeed.sequence.layer": "zeal.sequence.layer",
    "deepspeed.sequence.cross_entropy": "zeal.sequence.cross_entropy",
    "deepspeed.runtime.sequence_parallel": {},
    "deepspeed.runtime.sequence_parallel.parallel_state_sp": "zeal.sequence.parallel_state_sp",
    "deepspeed.runtime.sequence_parallel.ulysses_sp": "zeal.sequence.ulysses_sp",
    "deepspeed.checkpointing": "zeal.checkpointing",
    "deepspeed.runtime": {},
    "deepspeed.runtime.engine": {"DeepSpeedEngine": "zeal.engine:ZealEngine"},
    "deepspeed.runtime.pipe": "zeal.pipe:*",
    "deepspeed.runtime.pipe.engine": {"PipelineEngine": "zeal.pipe:PipelineEngine"},
    "deepspeed.runtime.pipe.module": "zeal.pipe",
    "deepspeed.runtime.lr_schedules": {"VALID_LR_SCHEDULES": "zeal._zeal:LR_SCHEDULES"},
    "deepspeed.runtime.zero": "zeal.zero:*",
    "deepspeed.runtime.zero.partition_parameters": "zeal.zero",
    "deepspeed.runtime.activation_checkpointing": {},
    "deepspeed.runtime.activation_checkpointing.checkpointing": "zeal.checkpointing",
    "deepspeed.ops": {},
    "deepspeed.ops.adam": {"DeepSpeedCPUAdam": "zeal.optim:CPUAdam", "FusedAdam": "zeal.optim:FusedAdam"},
    "deepspeed.ops.adagrad": {"DeepSpeedCPUAdagrad": "zeal.optim:CPUAdagrad"},
    "deepspeed.ops.lamb": {"FusedLamb": "zeal.optim:FusedLamb"},
    "deepspeed.checkpoint": {},
    "deepspeed.checkpoint.utils": {"clone_tensors_for_torch_save": "zeal.checkpoint:clone_tensors_for_torch_save"},
    "deepspeed.profiling": {},
    "deepspeed.profiling.flops_profiler": "zeal.profiling.flops_profiler",
    "deepspeed.launcher": {},
    "deepspeed.launcher.runner": {"DEEPSPEED_ENVIRONMENT_NAME": "zeal.launcher:DEEPSPEED_ENVIRONMENT_NAME"},
}


def _resolve(ref):
    module, _, attr = ref.partition(":")
    obj = importlib.import_module(module)
    return getattr(obj, attr) if attr else obj


def _made_module(name, table):
    module = types.ModuleType(name, f"DeepSpeed's {name}, served by Zeal")
    module.__spec__ = importlib.machinery.ModuleSpec(name, None, is_package=True)
    module.__path__ = []
    for attr, ref in table.items():
        setattr(module, attr, _resolve(ref))
    return module


def bind(name, namespace):
    """Makes the module `name` (the shim's `deepspeed`, whose globals are `namespace`) Zeal's
    DeepSpeed surface: zeal's top-level names, DeepSpeed's version with "+zeal", and every module
    path in MODULES registered in sys.modules (so `import deepspeed.ops.adam` finds it)."""
    import zeal

    for attr in dir(zeal):
        if not attr.startswith("__"):
            namespace.setdefault(attr, getattr(zeal, attr))
    namespace["__version__"] = _version()
    namespace["__zeal__"] = zeal.__version__
    namespace["__path__"] = []  # no submodule outside MODULES is looked for on disk
    root = sys.modules[name]
    made = {}
    for path in sorted(MODULES, key=lambda p: p.count(".")):
        ref = MODULES[path]
        if isinstance(ref, dict):
            module = _made_module(path, ref)
        elif ref.endswith(":*"):
            source = importlib.import_module(ref[:-2])
            module = _made_module(path, {})
            module.__dict__.update({k: v for k, v in vars(source).items() if not k.startswith("__")})
        else:
            module = _resolve(ref)
        made[path] = module
        sys.modules[path] = module
    for path, module in made.items():
        parent, _, leaf = path.rpartition(".")
        # a made module gets its children as attributes; a whole Zeal module keeps its own
        owner = root if parent == "deepspeed" else made[parent]
        if owner is root or not isinstance(MODULES[parent], str) or MODULES[parent].endswith(":*"):
            setattr(owner, leaf, module)
    namespace.update({leaf: made[f"deepspeed.{leaf}"] for leaf in ("comm", "zero", "utils", "ops", "runtime",
                                                                   "accelerator", "checkpoint", "pipe",
                                                                   "checkpointing", "profiling", "moe")})


# --- Accelerate on a host with no accelerator ----------------------------------------------------

def adopt_accelerate_cpu_state():
    """Note [Accelerate on a CPU-only host]: Accelerate (1.16) picks its distributed backend from the
    device torch reports; with none it records a DeepSpeed job as one process per rank (backend
    None, num_processes 1), so every rank would read the same batches and the batch-size arithmetic
    would disagree with the engine's world. DeepSpeed's CPU accelerator meets the same wall. When
    Accelerate's PartialState asks deepspeed.comm.init_distributed for a backend-less start, Zeal
    tells that state what it has started instead: the gloo group over all ranks, as Accelerate's
    own multi-CPU path would have. Nothing changes when a device was found or outside Accelerate."""
    frame = sys._getframe(1)
    for _ in range(4):  # init_distributed's caller, or its caller's
        frame = frame.f_back
        if frame is None:
            return
        state = frame.f_locals.get("self")
        if type(state).__name__ == "PartialState" and type(state).__module__ == "accelerate.state":
            break
    else:
        return
    import torch.distributed as dist

    if getattr(state, "backend", "") is None and dist.is_initialized():
        from accelerate.utils import DistributedType

        state.backend = "gloo"
        state.distributed_type = DistributedType.MULTI_CPU


# --- install / uninstall --------------------------------------------------------------------------

SHIM = '''# Written by `zeal-deepspeed install`: `import deepspeed` is Zeal ({version}).
# `zeal-deepspeed uninstall` removes this package; docs/huggingface.md says more.
from zeal.as_deepspeed import bind as _bind

_bind(__name__, globals())
'''


def _site_dir():
    return Path(sysconfig.get_paths()["purelib"])


def _ours(dist_info):
    installer = dist_info / "INSTALLER"
    return installer.is_file() and installer.read_text().strip() == MARKER


def _dist_infos(target):
    return sorted(Path(target).glob("deepspeed-*.dist-info"))


def _real_deepspeed():
    """A DeepSpeed distribution on sys.path that is not this shim: (version, location) or None."""
    for dist in importlib.metadata.distributions(name="deepspeed"):
        if (dist.read_text("INSTALLER") or "").strip() != MARKER:
            return dist.version, str(dist.locate_file(""))
    return None


def install(target=None, force=False):
    target = Path(target) if target else _site_dir()
    target.mkdir(parents=True, exist_ok=True)
    for info in _dist_infos(target):
        if not _ours(info):
            raise SystemExit(f"zeal-deepspeed: {info} belongs to a real DeepSpeed installation in {target}; "
                             "Zeal never overwrites it (pip uninstall deepspeed, or install the shim with "
                             "--target into a directory of its own)")
    if (target / "deepspeed").exists() and not _dist_infos(target):
        raise SystemExit(f"zeal-deepspeed: {target / 'deepspeed'} exists and is not the shim; not touching it")
    real = _real_deepspeed()
    if real and not force:
        raise SystemExit(f"zeal-deepspeed: DeepSpeed {real[0]} is installed at {real[1]}; the shim would shadow "
                         "it. Pass --force to install anyway (uninstall restores it).")
    uninstall(target, quiet=True)
    version = _version()
    package = target / "deepspeed"
    package.mkdir()
    (package / "__init__.py").write_text(SHIM.format(version=version))
    info = target / f"deepspeed-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: deepspeed\nVersion: {v}\n"
        "Summary: Zeal standing in for DeepSpeed (installed by zeal-deepspeed; not Microsoft's DeepSpeed)\n"
        "Requires-Dist: zeal\n".format(v=version))
    (info / "INSTALLER").write_text(MARKER + "\n")
    (info / "top_level.txt").write_text("deepspeed\n")
    files = ["deepspeed/__init__.py", f"{info.name}/METADATA", f"{info.name}/INSTALLER",
             f"{info.name}/top_level.txt", f"{info.name}/RECORD"]
    (info / "RECORD").write_text("".join(f"{f},,\n" for f in files))
    print(f"zeal-deepspeed: `import deepspeed` now resolves to Zeal {version} ({target})")
    return target


def uninstall(target=None, quiet=False):
    target = Path(target) if target else _site_dir()
    removed = False
    for info in _dist_infos(target):
        if not _ours(info):
            continue
        for line in (info / "RECORD").read_text().splitlines():
            path = target / line.split(",")[0]
            if path.is_file():
                path.unlink()
        pycache = target / "deepspeed" / "__pycache__"
        if pycache.is_dir():
            shutil.rmtree(pycache)
        for d in (target / "deepspeed", info):
            if d.is_dir() and not any(d.iterdir()):
                d.rmdir()
        removed = True
    if not quiet:
        print(f"zeal-deepspeed: {'removed the shim from' if removed else 'no shim in'} {target}")
    return removed


def status():
    spec = importlib.util.find_spec("deepspeed")
    if spec is None:
        print("zeal-deepspeed: `import deepspeed` finds nothing")
        return 1
    dist = importlib.metadata.distribution("deepspeed")
    what = "Zeal (shim)" if (dist.read_text("INSTALLER") or "").strip() == MARKER else "DeepSpeed"
    print(f"zeal-deepspeed: `import deepspeed` is {what} {dist.version} from {spec.origin}")
    return 0


def main(argv=None):
    parser = argparse.ArgumentParser(prog="zeal-deepspeed", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p_install = sub.add_parser("install", help="make `import deepspeed` resolve to Zeal")
    p_install.add_argument("--target", help="site directory to write into (default: this interpreter's)")
    p_install.add_argument("--force", action="store_true", help="shadow a real DeepSpeed found elsewhere")
    p_uninstall = sub.add_parser("uninstall", help="remove the shim")
    p_uninstall.add_argument("--target")
    sub.add_parser("status", help="say what `import deepspeed` resolves to")
    args = parser.parse_args(argv)
    if args.command == "install":
        install(args.target, args.force)
    elif args.command == "uninstall":
        uninstall(args.target)
    else:
        return status()
    return 0


if __name__ == "__main__":
    sys.exit(main())
