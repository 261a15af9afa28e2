"""initialize(optimizer=<torch optimizer>, lr_scheduler=<torch scheduler>): the user's SGD with
momentum, AdamW and Adagrad, driven by a torch LambdaLR, at ZeRO stages 0-3 on 2 and 4 ranks,
reproduce a single-process torch run (fp32, 1e-5 relative; measured 2e-7 to 3.4e-6, the spread
being the order of the gradient sums). The rank script also checks the ZeRO debugging API against
the reference gradients and optimizer state, and that a checkpoint of the user's optimizer state
resumes to the same parameters. One mpirun per world size runs every case."""
import pytest
import torch

import zeal
from conftest import run_mpi


@pytest.mark.parametrize("world", [2, 4])
def test_client_optimizers_match_torch_at_every_stage(world):
    proc = run_mpi(world, "client_optim.py", timeout=600)
    for kind in ("sgd", "adamw", "adagrad"):
        for stage in range(4):
            assert f"client {kind} stage {stage} world {world}:" in proc.stdout
    assert "checkpoint resume: ok" in proc.stdout


def mlp():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2))


CFG = {"train_micro_batch_size_per_gpu": 4, "steps_per_print": 1000}


def test_untested_optimizer_needs_the_flag_at_zero_stages():
    model = mlp()
    sgd = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(zeal.ConfigError, match="zero_allow_untested_optimizer"):
        zeal.initialize(model=model, optimizer=sgd, config=dict(CFG, zero_optimization={"stage": 1}))
    engine, *_ = zeal.initialize(model=mlp(), optimizer=lambda p: torch.optim.SGD(p, lr=0.1),
                                 config=dict(CFG, zero_optimization={"stage": 1}, zero_allow_untested_optimizer=True))
    assert engine.optimizer_name() == "SGD"
    # Stage 0 has no such rule (DeepSpeed's is for ZeRO only).
    zeal.initialize(model=mlp(), optimizer=lambda p: torch.optim.SGD(p, lr=0.1), config=dict(CFG))


def test_zero_offload_wants_cpu_adam_unless_forced_off():
    offload = {"stage": 2, "offload_optimizer": {"device": "cpu"}}
    model = mlp()
    with pytest.raises(zeal.ConfigError, match="zero_force_ds_cpu_optimizer"):
        zeal.initialize(model=model, optimizer=torch.optim.AdamW(model.parameters()),
                        config=dict(CFG, zero_optimization=offload))
    model = mlp()
    engine, opt, *_ = zeal.initialize(model=model, optimizer=torch.optim.AdamW(model.parameters(), lr=0.01),
                                      config=dict(CFG, zero_optimization=offload, zero_force_ds_cpu_optimizer=False))
    before = [p.detach().clone() for p in model.parameters()]
    engine.backward(engine(torch.randn(4, 6)).pow(2).mean())
    engine.step()
    assert all(not torch.equal(a, p) for a, p in zip(before, model.parameters()))


def test_lr_written_into_param_groups_takes_effect():
    # What a torch or Hugging Face scheduler does: write group["lr"]; the next step uses it.
    model = mlp()
    engine, opt, *_ = zeal.initialize(model=model, config=dict(CFG, optimizer={"type": "SGD", "params": {"lr": 0.1}}))
    assert isinstance(opt, torch.optim.Optimizer)
    x = torch.randn(4, 6)
    opt.param_groups[0]["lr"] = 0.0
    before = [p.detach().clone() for p in model.parameters()]
    engine.backward(engine(x).pow(2).mean())
    engine.step()
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))
    assert engine.get_lr() == [0.0]
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 ** s)
    assert opt.param_groups[0]["initial_lr"] == 0.0
    opt.param_groups[0]["lr"] = 0.2
    engine.backward(engine(x).pow(2).mean())
    engine.step()
    assert any(not torch.equal(a, p) for a, p in zip(before, model.parameters()))
    assert sched.get_last_lr() == [0.0]
    state = opt.state_dict()
    assert state["optimizer"] == "SGD" and state["param_groups"][0]["lr"] == 0.2
    opt.load_state_dict(state)
    with pytest.raises(RuntimeError, match="engine.step"):
        opt.step()
