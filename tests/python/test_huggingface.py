"""The Hugging Face path on Zeal: `zeal-deepspeed install` makes `import deepspeed` resolve to Zeal,
and an unmodified transformers Trainer script (hf/trainer_script.py) and Accelerate script
(hf/accelerate_script.py) train with `--deepspeed` configs in transformers' own style ("auto"
values) on 2 real ranks, through torchrun and the zeal launcher. The reference is the same script
without DeepSpeed: plain torch DDP (gloo) on the same ranks, same seed: fp32 losses to 1e-5.
"""
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

transformers = pytest.importorskip("transformers", reason="transformers is installed by scripts/install-deps")
pytest.importorskip("accelerate", reason="accelerate is installed by scripts/install-deps")

HERE = Path(__file__).resolve().parent
HF = HERE / "hf"

# transformers' documented ZeRO configs: every value the Trainer knows left as "auto".
BASE = {
    "fp16": {"enabled": "auto"},
    "bf16": {"enabled": "auto"},
    "train_batch_size": "auto",
    "train_micro_batch_size_per_gpu": "auto",
    "gradient_accumulation_steps": "auto",
    "gradient_clipping": "auto",
    "steps_per_print": 2000,
    "wall_clock_breakdown": False,
}
OPTIMIZER = {"type": "AdamW", "params": {"lr": "auto", "betas": "auto", "eps": "auto", "weight_decay": "auto"}}
SCHEDULER = {"type": "WarmupDecayLR", "params": {"warmup_min_lr": "auto", "warmup_max_lr": "auto",
                                                 "warmup_num_steps": "auto", "total_num_steps": "auto"}}


def ds_config(stage, optimizer=True, scheduler=False, offload=False):
    cfg = json.loads(json.dumps(BASE))
    zero = {"stage": stage}
    if stage >= 1:
        zero.update({"overlap_comm": True, "contiguous_gradients": True, "reduce_bucket_size": "auto"})
    if stage == 3:
        zero.update({"stage3_prefetch_bucket_size": "auto", "stage3_param_persistence_threshold": "auto",
                     "stage3_gather_16bit_weights_on_model_save": True})
    if offload:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    cfg["zero_optimization"] = zero
    if optimizer:
        cfg["optimizer"] = OPTIMIZER
    if scheduler:
        cfg["scheduler"] = SCHEDULER
    return cfg


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def shim(tmp_path_factory):
    """A directory holding the `deepspeed` shim, for PYTHONPATH (a real DeepSpeed may be installed
    here for the benchmarks: --force shadows it for these processes only)."""
    target = tmp_path_factory.mktemp("shim")
    proc = subprocess.run([shutil.which("zeal-deepspeed"), "install", "--target", str(target), "--force"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return target


def _env(shim_dir):
    from conftest import mpi_env

    env = mpi_env()
    for key in [k for k in env if k.startswith("OMPI_COMM_WORLD")]:
        del env[key]
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(shim_dir) if shim_dir else "", env.get("PYTHONPATH", "")) if p)
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               HF_DATASETS_OFFLINE="1", WANDB_DISABLED="true", OMP_NUM_THREADS="1")
    return env


def _python(shim_dir, code, timeout=180):
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout,
                          env=_env(shim_dir))


def run_script(script, args, launcher="torchrun", shim_dir=None, ranks=2, timeout=420):
    if launcher == "torchrun":
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(ranks),
               "--master_port", str(_free_port()), str(script), *map(str, args)]
    else:
        cmd = [shutil.which("zeal"), "--num_procs", str(ranks), "--master_port", str(_free_port()), str(script),
               *map(str, args)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=_env(shim_dir))
    if proc.returncode != 0:
        pytest.fail(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-6000:]}\n{proc.stderr[-8000:]}")
    return proc


TRAIN_ARGS = ["--per_device_train_batch_size", 2, "--gradient_accumulation_steps", 2, "--learning_rate", 1e-3,
              "--max_steps", 6, "--logging_steps", 1, "--save_steps", 3, "--seed", 7, "--report_to", "none",
              "--disable_tqdm", "true", "--dataloader_num_workers", 0]


def trainer_run(tmp_path, name, config=None, launcher="torchrun", shim_dir=None, extra=()):
    out_dir = tmp_path / name
    args = ["--output_dir", out_dir, *TRAIN_ARGS, "--out", tmp_path / f"{name}.json", *extra]
    if config is None:
        args += ["--use_cpu", "true"]
    else:
        path = tmp_path / f"{name}_ds.json"
        path.write_text(json.dumps(config))
        args += ["--deepspeed", path]
    run_script(HF / "trainer_script.py", args, launcher, shim_dir)
    return json.loads((tmp_path / f"{name}.json").read_text()), out_dir


def rel_diff(got, want):
    return max(abs(g - w) / max(abs(w), 1e-12) for g, w in zip(got, want))


# The references run with the shim on the path too: Accelerate imports `deepspeed` for isinstance
# checks even on its DDP path, and a real DeepSpeed installed beside (for the benchmarks) hangs
# that import at 2 ranks on this machine; no DeepSpeed code runs on the DDP path either way.

@pytest.fixture(scope="module")
def ddp_reference(tmp_path_factory, shim):
    """The Trainer script without DeepSpeed: torch DDP over gloo on 2 ranks."""
    tmp = tmp_path_factory.mktemp("ddp")
    result, _ = trainer_run(tmp, "ddp", shim_dir=shim)
    assert len(result["losses"]) == 6
    return result


# --- the shim ------------------------------------------------------------------------------------

def test_shim_is_what_transformers_and_accelerate_find(shim):
    code = """
import importlib.metadata, deepspeed, zeal
from transformers.integrations import is_deepspeed_available as hf_has
from accelerate.utils import is_deepspeed_available as acc_has
import deepspeed.comm, deepspeed.zero, deepspeed.ops.adam, deepspeed.ops.adagrad, deepspeed.utils
from deepspeed.runtime.zero import partition_parameters as pp
from deepspeed.checkpoint.utils import clone_tensors_for_torch_save
from deepspeed.launcher.runner import DEEPSPEED_ENVIRONMENT_NAME
from deepspeed.accelerator import get_accelerator
from deepspeed.utils import logger, set_z3_leaf_modules
v = importlib.metadata.version("deepspeed")
checks = {
  "hf": hf_has() is True, "accelerate": acc_has() is True, "local version": v.endswith("+zeal." + zeal.__version__),
  "__version__": deepspeed.__version__ == v, "__zeal__": deepspeed.__zeal__ == zeal.__version__,
  "engine": deepspeed.DeepSpeedEngine is zeal.ZealEngine and deepspeed.runtime.engine.DeepSpeedEngine is zeal.ZealEngine,
  "schedules": list(deepspeed.runtime.lr_schedules.VALID_LR_SCHEDULES) == ["WarmupLR", "WarmupDecayLR", "WarmupCosineLR", "OneCycle", "LRRangeTest"],
  "pp": callable(pp.zero_wrapper_for_fp_tensor_constructor) and pp._orig_torch_arange is not None and pp.get_accelerator is get_accelerator,
  "init": deepspeed.zero.Init is zeal.zero.Init and deepspeed.zero.GatheredParameters is zeal.zero.GatheredParameters,
  "ops": deepspeed.ops.adam.DeepSpeedCPUAdam is zeal.optim.CPUAdam and deepspeed.ops.adagrad.DeepSpeedCPUAdagrad is zeal.optim.CPUAdagrad,
  "comm": deepspeed.comm.get_rank is zeal.comm.get_rank and deepspeed.comm.init_distributed is zeal.comm.init_distributed,
  "env name": DEEPSPEED_ENVIRONMENT_NAME == ".deepspeed_env",
}
bad = [k for k, ok in checks.items() if not ok]
if bad:
    raise SystemExit(f"wrong: {bad} (version {v})")
print("SHIM OK", v)
"""
    proc = _python(shim, code)
    assert proc.returncode == 0 and "SHIM OK" in proc.stdout, proc.stdout + proc.stderr


def test_compatibility_table_of_the_hugging_face_path_matches_the_shim(shim):
    """docs/compatibility.md's Hugging Face table: every name marked supported resolves under
    `deepspeed.` through the shim, and every "not yet" does not."""
    import re

    from conftest import ROOT

    text = (ROOT / "docs" / "compatibility.md").read_text()
    start = text.index("### The Hugging Face path")
    section = text[start:text.find("\n#", start + 4)]
    found = re.findall(r"^\| `([^`]+)` \| ([^|]+) \|$", section, flags=re.M)
    header = re.search(r": (\d+) of (\d+) supported", section)
    assert len(found) == int(header.group(2)) and sum(s.startswith("yes") for _, s in found) == int(header.group(1))
    code = f"""
import importlib, deepspeed
rows = {[(n, s.startswith("yes")) for n, s in found]!r}
wrong = []
for name, want in rows:
    obj, ok = deepspeed, True
    for part in name.split("."):
        if not hasattr(obj, part):
            ok = False
            break
        obj = getattr(obj, part)
    if ok != want:
        wrong.append(name)
print("WRONG", wrong)
"""
    proc = _python(shim, code)
    assert proc.returncode == 0 and "WRONG []" in proc.stdout, proc.stdout + proc.stderr


def test_shim_refuses_to_shadow_real_deepspeed_unless_forced_and_uninstalls_cleanly(tmp_path):
    # A stand-in for a real DeepSpeed installation, found on PYTHONPATH.
    real = tmp_path / "real"
    (real / "deepspeed-0.19.8.dist-info").mkdir(parents=True)
    (real / "deepspeed-0.19.8.dist-info" / "METADATA").write_text("Metadata-Version: 2.1\nName: deepspeed\nVersion: 0.19.8\n")
    target = tmp_path / "site"
    env = dict(os.environ, PYTHONPATH=str(real))
    cli = shutil.which("zeal-deepspeed")
    proc = subprocess.run([cli, "install", "--target", str(target)], capture_output=True, text=True, env=env)
    assert proc.returncode != 0 and "DeepSpeed 0.19.8 is installed" in (proc.stdout + proc.stderr)
    assert not (target / "deepspeed").exists()
    proc = subprocess.run([cli, "install", "--target", str(target), "--force"], capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr
    assert (target / "deepspeed" / "__init__.py").is_file() and len(list(target.glob("deepspeed-*+zeal.*.dist-info"))) == 1
    # Never overwrites a real DeepSpeed's files in the same directory.
    proc = subprocess.run([cli, "install", "--target", str(real), "--force"], capture_output=True, text=True, env=env)
    assert proc.returncode != 0 and "belongs to a real DeepSpeed" in (proc.stdout + proc.stderr)
    # Uninstall leaves the directory as it was.
    subprocess.run([sys.executable, "-c", f"import sys; sys.path.insert(0, {str(target)!r}); import deepspeed"],
                   check=True, env=env, capture_output=True)  # leaves a __pycache__ behind
    proc = subprocess.run([cli, "uninstall", "--target", str(target)], capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr
    assert list(target.iterdir()) == []


def test_unfilled_auto_names_the_key_and_who_fills_it():
    import zeal

    cfg = ds_config(2)
    cfg["train_micro_batch_size_per_gpu"] = 2
    cfg.pop("train_batch_size")
    cfg["gradient_accumulation_steps"] = 1
    with pytest.raises(zeal.ConfigError) as e:
        zeal._zeal.validate_config(json.dumps(cfg))
    msg = str(e.value)
    assert "'" in msg and "auto" in msg and "Hugging Face Trainer or Accelerate" in msg, msg


# --- transformers' Trainer ---------------------------------------------------------------------

@pytest.mark.parametrize("stage,optimizer,launcher", [
    (2, True, "torchrun"), (3, False, "zeal"),
    # the slow tier: the other stages, and each launcher with each optimizer source
    pytest.param(0, True, "zeal", marks=pytest.mark.slow), pytest.param(0, False, "torchrun", marks=pytest.mark.slow),
    pytest.param(1, True, "torchrun", marks=pytest.mark.slow), pytest.param(1, False, "zeal", marks=pytest.mark.slow),
    pytest.param(2, False, "zeal", marks=pytest.mark.slow), pytest.param(3, True, "torchrun", marks=pytest.mark.slow)])
def test_trainer_matches_ddp_resumes_and_saves(tmp_path, shim, ddp_reference, stage, optimizer, launcher):
    """The unmodified Trainer script with transformers-style "auto" configs: the loss curve equals
    DDP's; resuming from the step-3 checkpoint reproduces steps 4-6; save_model writes weights
    from_pretrained loads, equal to the engine's own checkpoint of the same step."""
    cfg = ds_config(stage, optimizer=optimizer)
    got, out_dir = trainer_run(tmp_path, "zeal", cfg, launcher, shim)
    assert got["global_step"] == 6
    assert rel_diff(got["losses"], ddp_reference["losses"]) <= 1e-5, (got["losses"], ddp_reference["losses"])
    assert rel_diff(got["grad_norms"], ddp_reference["grad_norms"]) <= 1e-4, (got["grad_norms"], ddp_reference["grad_norms"])
    assert (out_dir / "checkpoint-3" / "global_step3").is_dir()
    assert (out_dir / "checkpoint-3" / "latest").read_text().strip() == "global_step3"

    resumed, _ = trainer_run(tmp_path, "resumed", cfg, launcher, shim,
                             extra=["--resume", out_dir / "checkpoint-3"])
    assert rel_diff(resumed["losses"], got["losses"][3:]) <= 1e-5, (resumed["losses"], got["losses"])

    import torch
    from transformers import GPT2LMHeadModel

    import zeal.checkpoint

    loaded = GPT2LMHeadModel.from_pretrained(out_dir / "final")
    master = zeal.checkpoint.to_fp32_state_dict(str(out_dir / "checkpoint-6"))
    state = loaded.state_dict()
    for name, value in master.items():
        want = value.reshape(state[name].shape)
        assert torch.equal(state[name], want), name


def test_from_pretrained_under_zero3_builds_in_zero_init_and_trains_as_ddp(tmp_path, shim):
    """TrainingArguments with a ZeRO-3 config first, then from_pretrained: transformers builds the
    model inside deepspeed.zero.Init (from a config still holding "auto"), loads the weights
    through GatheredParameters on rank 0, and the Trainer trains it: the losses equal DDP's from
    the same saved weights."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(3)
    saved = tmp_path / "pretrained"
    GPT2LMHeadModel(GPT2Config(vocab_size=96, n_positions=16, n_embd=32, n_layer=2, n_head=2, resid_pdrop=0.0,
                               embd_pdrop=0.0, attn_pdrop=0.0)).save_pretrained(saved)
    ddp, _ = trainer_run(tmp_path, "ddp_pre", None, "torchrun", shim, extra=["--init_from", saved])
    got, _ = trainer_run(tmp_path, "z3_pre", ds_config(3, optimizer=False), "zeal", shim,
                         extra=["--init_from", saved])
    assert rel_diff(got["losses"], ddp["losses"]) <= 1e-5, (got["losses"], ddp["losses"])


@pytest.mark.parametrize("quantized", [False, True])
def test_trainer_with_a_frozen_base_partitions_it(tmp_path, shim, quantized):
    """Adapter-style fine-tuning through the Trainer at ZeRO-3: the model built in zero.Init by
    from_pretrained, everything but the last block frozen, and the Trainer's optimizer over the
    trainable parameters only. The frozen base is partitioned (Note [Frozen parameters]): the losses
    equal DDP's with the same freeze, and the saved model holds the frozen weights unchanged. With
    zero_quantized_nontrainable_weights they are stored as 8-bit blocks: the saved frozen weights
    are the quantized values (within 1/127 of each weight's largest, never all equal), and the
    losses stay within 3e-4 of DDP's (measured 3.6e-5: the weights move by at most half a level,
    1/254 of a block's largest) but not equal to them."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(3)
    saved = tmp_path / "pretrained"
    GPT2LMHeadModel(GPT2Config(vocab_size=96, n_positions=16, n_embd=32, n_layer=2, n_head=2, resid_pdrop=0.0,
                               embd_pdrop=0.0, attn_pdrop=0.0)).save_pretrained(saved)
    extra = ["--init_from", saved, "--freeze_all_but", "h.1."]
    ddp, _ = trainer_run(tmp_path, "ddp_frozen", None, "torchrun", shim, extra=extra)
    cfg = ds_config(3, optimizer=False)
    cfg["zero_optimization"]["zero_quantized_nontrainable_weights"] = quantized
    got, out_dir = trainer_run(tmp_path, "z3_frozen", cfg, "zeal", shim, extra=extra)
    diff = rel_diff(got["losses"], ddp["losses"])
    assert diff <= (3e-4 if quantized else 1e-5) and (diff > 1e-6 or not quantized), (got["losses"], ddp["losses"])
    reference = GPT2LMHeadModel.from_pretrained(saved)
    before, after = reference.state_dict(), GPT2LMHeadModel.from_pretrained(out_dir / "final").state_dict()
    frozen = [n for n, _ in reference.named_parameters() if "h.1." not in n]
    assert frozen
    worst = max(((after[n] - before[n]).abs().max() / before[n].abs().max().clamp_min(1e-12)).item() for n in frozen)
    if quantized:
        assert 0 < worst <= 1 / 127, worst
    else:
        assert worst == 0, worst
    trained = [n for n in before if "h.1.mlp.c_fc.weight" in n]
    assert all(not torch.equal(after[n], before[n]) for n in trained)


def test_trainer_config_scheduler_and_offload_train(tmp_path, shim):
    """A config with its own WarmupDecayLR scheduler ("auto" steps from the Trainer) and the
    optimizer offloaded to the CPU: trains, the learning rate follows DeepSpeed's WarmupDecayLR."""
    cfg = ds_config(2, optimizer=True, scheduler=True, offload=True)
    got, out_dir = trainer_run(tmp_path, "sched", cfg, "torchrun", shim)
    assert got["global_step"] == 6 and all(l == l for l in got["losses"])
    state = json.loads((out_dir / "checkpoint-6" / "trainer_state.json").read_text())
    lrs = [e["learning_rate"] for e in state["log_history"] if "learning_rate" in e]
    # DeepSpeed's WarmupDecayLR with the Trainer's fill (warmup_num_steps = max(1, 0) = 1, raised to
    # DeepSpeed's minimum of 2; total_num_steps = 6), logged after the engine stepped it, iteration
    # t = 0..5: a log warmup min + (max - min) * ln(t + 1) / ln(2) for t < 2, then max * (6 - t) / (6 - 2).
    want = [0.0, 1e-3] + [1e-3 * (6 - t) / 4 for t in range(2, 6)]
    assert max(abs(a - b) for a, b in zip(lrs, want)) <= 1e-12 and len(lrs) == 6, (lrs, want)


# --- Accelerate ----------------------------------------------------------------------------------

ACCELERATE_CONFIG = {"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
                     "gradient_clipping": 0.0, "bf16": {"enabled": "auto"}, "fp16": {"enabled": "auto"}}


def accelerate_config(stage):
    cfg = dict(ACCELERATE_CONFIG, zero_optimization={"stage": stage, "reduce_bucket_size": "auto"})
    if stage == 3:
        cfg["zero_optimization"].update(stage3_prefetch_bucket_size="auto", stage3_param_persistence_threshold="auto")
    return cfg


@pytest.fixture(scope="module")
def accelerate_reference(tmp_path_factory, shim):
    """The Accelerate script without DeepSpeed: DDP over gloo on 2 CPU ranks (ACCELERATE_USE_CPU)."""
    tmp = tmp_path_factory.mktemp("acc_ddp")
    out = tmp / "ddp.json"
    env = _env(shim)
    env["ACCELERATE_USE_CPU"] = "1"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()),
           str(HF / "accelerate_script.py"), "--out", str(out)]
    # The reference (plain torch DDP, no Zeal) could hang at exit in torch's gloo teardown (a GIL
    # deadlock, accelerate_script.py); the script now leaves without it. It keeps a deadline and one
    # more try, and a hang is reported.
    for attempt in (1, 2):
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=150, env=env)
            break
        except subprocess.TimeoutExpired as e:
            if attempt == 2:
                raise
            import warnings

            warnings.warn(f"the DDP reference hung; trying once more: {str(e.stderr or '')[-2000:]}")
            cmd[cmd.index("--master_port") + 1] = str(_free_port())
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-8000:]
    return json.loads(out.read_text())


def test_accelerate_with_a_deepspeed_plugin_matches_ddp(tmp_path, shim, accelerate_reference):
    """Accelerator(deepspeed_plugin=DeepSpeedPlugin(hf_ds_config=...)) with the user's torch AdamW and
    linear schedule, ZeRO-2, under torchrun: every micro-step's loss equals DDP's."""
    cfg = tmp_path / "ds.json"
    cfg.write_text(json.dumps(accelerate_config(2)))
    out = tmp_path / "zeal.json"
    run_script(HF / "accelerate_script.py", ["--deepspeed", cfg, "--out", out], "torchrun", shim)
    got = json.loads(out.read_text())
    assert got["updates"] == 6 and len(got["losses"]) == len(accelerate_reference["losses"]) == 12
    assert rel_diff(got["losses"], accelerate_reference["losses"]) <= 1e-5, (got, accelerate_reference)


def test_accelerate_launch_with_a_deepspeed_config_file_matches_ddp(tmp_path, shim, accelerate_reference):
    """`accelerate launch --config_file` naming distributed_type DEEPSPEED and a ZeRO-3 config file
    (zero3_init_flag on), the script unchanged: the losses equal DDP's."""
    cfg = tmp_path / "ds.json"
    cfg.write_text(json.dumps(accelerate_config(3)))
    port = _free_port()
    (tmp_path / "accelerate.yaml").write_text(
        "compute_environment: LOCAL_MACHINE\ndistributed_type: DEEPSPEED\ndeepspeed_config:\n"
        f"  deepspeed_config_file: {cfg}\n  zero3_init_flag: true\nmachine_rank: 0\nmain_training_function: main\n"
        f"num_machines: 1\nnum_processes: 2\nmain_process_port: {port}\nuse_cpu: false\n")
    out = tmp_path / "zeal.json"
    cmd = [shutil.which("accelerate"), "launch", "--config_file", str(tmp_path / "accelerate.yaml"),
           str(HF / "accelerate_script.py"), "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=420, env=_env(shim))
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-8000:]
    got = json.loads(out.read_text())
    assert rel_diff(got["losses"], accelerate_reference["losses"]) <= 1e-5, (got, accelerate_reference)
