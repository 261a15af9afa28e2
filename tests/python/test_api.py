"""The Python API in one process (world size 1): what initialize returns and how the engine acts."""
import math

import pytest
import torch

import zeal

BASE = {"train_micro_batch_size_per_gpu": 4, "optimizer": {"type": "AdamW", "params": {"lr": 0.01}},
        "steps_per_print": 1000}


def mlp():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2))


def test_initialize_returns_deepspeed_tuple_and_trains():
    model = mlp()
    data = torch.utils.data.TensorDataset(torch.randn(64, 6), torch.randn(64, 2))
    engine, optimizer, loader, scheduler = zeal.initialize(model=model, training_data=data, config=dict(BASE))
    assert isinstance(engine, zeal.ZealEngine) and isinstance(engine, torch.nn.Module)
    assert engine.module is model
    assert scheduler is None
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.01)
    assert engine.train_batch_size() == 4 and engine.gradient_accumulation_steps() == 1
    batches = list(loader)
    assert len(batches) == 16 and batches[0][0].shape == (4, 6)
    losses = []
    for _ in range(5):
        for x, y in batches:
            loss = torch.nn.functional.mse_loss(engine(x), y)
            engine.backward(loss)
            engine.step()
            losses.append(loss.item())
    assert engine.global_steps == 80 and engine.global_samples == 320
    assert sum(losses[-16:]) < 0.8 * sum(losses[:16])


def test_parameters_are_views_into_one_flat_buffer():
    model = mlp()
    zeal.initialize(model=model, config=dict(BASE))
    params = list(model.parameters())
    base = params[0].untyped_storage().data_ptr()
    offset = 0
    for p in reversed(params):  # laid out last to first, the order backward produces gradients
        assert p.untyped_storage().data_ptr() == base  # one storage: the engine's flat buffer
        assert p.storage_offset() == offset
        assert p.grad is not None and p.grad.untyped_storage().data_ptr() == params[0].grad.untyped_storage().data_ptr()
        offset += p.numel()


def test_gradient_accumulation_boundary_and_train_eval():
    model = mlp()
    cfg = dict(BASE, gradient_accumulation_steps=3)
    engine, *_ = zeal.initialize(model=model, config=cfg)
    boundaries = []
    for _ in range(6):
        boundaries.append(engine.is_gradient_accumulation_boundary())
        engine.backward(engine(torch.randn(4, 6)).sum())
        engine.step()
    assert boundaries == [False, False, True, False, False, True]
    assert engine.global_steps == 2 and engine.micro_steps == 6
    engine.eval()
    assert not model.training
    engine.train()
    assert model.training


def test_param_groups_keep_their_own_settings():
    model = mlp()
    frozen, trained = list(model[0].parameters()), list(model[2].parameters())
    before = [p.detach().clone() for p in frozen]
    engine, optimizer, *_ = zeal.initialize(
        model=model, model_parameters=[{"params": frozen, "lr": 0.0}, {"params": trained}], config=dict(BASE))
    engine.backward(engine(torch.randn(4, 6)).pow(2).sum())
    engine.step()
    assert all(torch.equal(b, p) for b, p in zip(before, frozen))
    assert [g["lr"] for g in optimizer.param_groups] == [0.0, pytest.approx(0.01)]


def test_warmup_lr_follows_deepspeed():
    cfg = dict(BASE, scheduler={"type": "WarmupLR", "params": {"warmup_min_lr": 0.0, "warmup_max_lr": 0.1,
                                                               "warmup_num_steps": 5}})
    engine, _, _, scheduler = zeal.initialize(model=mlp(), config=cfg)
    assert scheduler.get_lr() == [0.0]  # DeepSpeed sets warmup_min_lr before the first step
    lrs = []
    for _ in range(7):
        engine.backward(engine(torch.randn(4, 6)).sum())
        engine.step()
        lrs.append(engine.get_lr()[0])
    want = [0.1 * math.log(i + 1) / math.log(5) if i < 5 else 0.1 for i in range(7)]
    assert lrs == pytest.approx(want, rel=1e-12)


def test_gradient_clipping_bounds_the_update():
    # With SGD (lr 1, no momentum) the update equals the clipped gradient: its norm must be 0.5.
    cfg = dict(BASE, optimizer={"type": "SGD", "params": {"lr": 1.0}}, gradient_clipping=0.5)
    model = mlp()
    engine, *_ = zeal.initialize(model=model, config=cfg)
    before = torch.cat([p.detach().reshape(-1).clone() for p in model.parameters()])
    engine.backward(engine(torch.randn(4, 6)).pow(2).sum() * 100)
    engine.step()
    after = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    assert (before - after).norm().item() == pytest.approx(0.5, rel=1e-4)


def test_config_from_file_and_json_string(tmp_path):
    path = tmp_path / "c.json"
    path.write_text('{"train_batch_size": 8, "optimizer": {"type": "SGD", "params": {"lr": 0.1}}}')
    engine, *_ = zeal.initialize(model=mlp(), config=str(path))
    assert engine.train_micro_batch_size_per_gpu() == 8
    engine, *_ = zeal.initialize(model=mlp(), config=path.read_text())
    assert engine.train_batch_size() == 8


def test_client_optimizer_wins_over_the_config_section_with_a_warning():
    # DeepSpeed uses the optimizer passed to initialize and ignores the config's section.
    model = mlp()
    sgd = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.warns(UserWarning, match="optimizer= is used"):
        engine, optimizer, *_ = zeal.initialize(model=model, optimizer=sgd, config=dict(BASE))
    assert optimizer.optimizer is sgd and engine.optimizer_name() == "SGD"
    assert optimizer.param_groups is sgd.param_groups and optimizer.param_groups[0]["lr"] == 0.1


def test_no_optimizer_anywhere_is_a_clear_error():
    cfg = {k: v for k, v in BASE.items() if k != "optimizer"}
    with pytest.raises(zeal.ConfigError) as e:
        zeal.initialize(model=mlp(), config=cfg)
    message = str(e.value)
    assert "no optimizer to train with" in message and "optimizer= to initialize" in message
    assert "torch optimizer object" not in message and "OneBitLamb" in message


def test_error_classes_map_to_python_kinds():
    assert issubclass(zeal.ConfigError, ValueError) and issubclass(zeal.ConfigError, zeal.Error)
    assert issubclass(zeal.TimeoutError, zeal.CommError) and issubclass(zeal.TimeoutError, TimeoutError)
    assert issubclass(zeal.IoError, OSError)
    with pytest.raises(zeal.CommError, match="avg needs a floating-point tensor"):
        zeal.world().all_reduce(torch.ones(3, dtype=torch.int32), "avg")


def test_steps_per_print_logs_loss_lr_scale_and_throughput(capfd):
    cfg = dict(BASE, steps_per_print=2, wall_clock_breakdown=True)
    engine, *_ = zeal.initialize(model=mlp(), config=cfg)
    for _ in range(4):
        engine.backward(engine(torch.randn(4, 6)).pow(2).mean())
        engine.step()
    err = capfd.readouterr().err
    lines = [line for line in err.splitlines() if "[engine]" in line and "| loss " in line]
    assert [line.split("step ")[1].split(" ")[0] for line in lines] == ["2", "4"], err
    assert all("| lr 1.000e-02 | loss scale 1 |" in line and "samples/s" in line for line in lines)
    assert sum("time (ms) forward" in line and "backward" in line for line in err.splitlines()) == 2


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_model_whose_only_parameter_is_empty_trains_at_every_stage(stage):
    # Before: ZeRO-1/2 failed inside torch.cat on an empty list while stage 3 accepted the model.
    class Empty(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.empty(0))

        def forward(self, x):
            return x.sum() + self.w.sum()

    engine, *_ = zeal.initialize(model=Empty(), config={
        "train_batch_size": 2, "optimizer": {"type": "Adam", "params": {"lr": 1e-3}},
        "zero_optimization": {"stage": stage}})
    for _ in range(2):
        loss = engine(torch.ones(2, 3, requires_grad=True))
        engine.backward(loss)
        engine.step()
    assert engine.global_steps == 2 and engine.module.w.numel() == 0


def test_comms_timeout_reaches_groups_cut_before_the_engine():
    # Tensor-parallel and pipeline set-ups cut their groups before any config is read; the
    # engine's comms_timeout_s must still bound their ops (Note [One comms timeout]).
    world = zeal.world()
    early = world.split([0], "tensor")
    try:
        zeal.initialize(model=torch.nn.Linear(4, 2), config={
            "train_batch_size": 1, "optimizer": {"type": "SGD", "params": {"lr": 0.1}}, "comms_timeout_s": 7})
        assert early.timeout_s == 7.0 and world.timeout_s == 7.0
        zeal.initialize(model=torch.nn.Linear(4, 2), config={
            "train_batch_size": 1, "optimizer": {"type": "SGD", "params": {"lr": 0.1}}})
        assert early.timeout_s == zeal._zeal.DEFAULT_COMMS_TIMEOUT_S == 300.0  # the one default
    finally:
        zeal._zeal.set_default_timeout(zeal._zeal.DEFAULT_COMMS_TIMEOUT_S)
