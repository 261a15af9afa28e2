"""Pipeline parallelism: schedules (zeal/parallel/schedule.h, exhaustively in tests/cpp/test_schedule.cpp),
layer partitioning, and training through zeal.pipe against a single-process torch run."""
import pytest
import torch

from conftest import run_mpi
from zeal import _zeal
from zeal.pipe import LayerSpec, partition_balanced, partition_layers, partition_uniform


def test_schedule_binding_gives_one_stage_s_instructions():
    got = _zeal.pipeline_schedule("1f1b", 2, 0, 3)
    assert all(isinstance(op, _zeal.PipeOp) for op, _, _ in got)
    assert [op.name for op, _, _ in got] == ["LoadMicroBatch", "Forward", "SendActivation",
                                        "LoadMicroBatch", "Forward", "SendActivation", "RecvGrad", "Backward",
                                        "LoadMicroBatch", "Forward", "SendActivation", "RecvGrad", "Backward",
                                        "RecvGrad", "Backward", "ReduceGrads", "OptimizerStep"]
    assert [mb for op, mb, _ in got if op == _zeal.PipeOp.Backward] == [0, 1, 2]
    with pytest.raises(_zeal.Error, match="multiple of the number of stages"):
        _zeal.pipeline_schedule("interleaved", 4, 0, 6, 2)


@pytest.mark.parametrize("p,m", [(4, 8), (4, 16), (4, 32), (2, 3)])
def test_simulated_bubbles_are_the_theoretical_ones(p, m):
    assert _zeal.pipeline_simulated_bubble("1f1b", p, m) == pytest.approx((p - 1) / (m + p - 1), abs=1e-12)
    if m % p == 0:
        assert _zeal.pipeline_simulated_bubble("interleaved", p, m, 2) == pytest.approx((p - 1) / (2 * m + p - 1),
                                                                                       abs=1e-12)


def test_partitions():
    assert partition_uniform(10, 4) == [0, 3, 6, 8, 10]
    assert partition_uniform(3, 3) == [0, 1, 2, 3]
    # The heaviest part as light as possible: 5 | 3 4 | 6 1 ... checked against every cut.
    weights = [5, 3, 4, 6, 1, 2, 7]
    bounds = partition_balanced(weights, 3)
    heaviest = max(sum(weights[a:b]) for a, b in zip(bounds, bounds[1:]))
    best = min(max(sum(weights[:i]), sum(weights[i:j]), sum(weights[j:]))
               for i in range(len(weights) + 1) for j in range(i, len(weights) + 1))
    assert heaviest == best == 10 and bounds[0] == 0 and bounds[-1] == len(weights)
    layers = [LayerSpec(torch.nn.Linear, 100, 100), torch.nn.ReLU(), LayerSpec(torch.nn.Linear, 100, 10),
              torch.nn.ReLU(), LayerSpec(torch.nn.Linear, 10, 10)]
    assert partition_layers(layers, 2, "parameters") == [0, 1, 5]  # 10100 | 1010 + 110
    assert partition_layers(layers, 2, "uniform") == [0, 3, 5]
    assert partition_layers(layers, 3, "type:relu") == [0, 1, 2, 5]  # no empty stage, one ReLU at most each
    with pytest.raises(ValueError, match="no layer's class name matches"):
        partition_layers(layers, 2, "type:conv")
    with pytest.raises(ValueError, match="partition_method"):
        partition_layers(layers, 2, "flops")


def _pipe(ranks, stages, *args, timeout=240):
    proc = run_mpi(ranks, "pipe_train.py", "--stages", stages, *args, timeout=timeout)
    assert proc.stdout.count("PIPE-OK") == ranks, proc.stdout + proc.stderr
    return proc


# Every run: 10 steps, each step's loss and then every stage's weights equal to one torch process
# training the same layers (same per-layer seeds) on the whole global batch, to 1e-5 relative.
@pytest.mark.parametrize("ranks,stages,args", [
    (2, 2, []),                                           # 1F1B, 4 micro-batches
    (4, 4, ["--gas", 8]),                                 # 4 stages, 8 micro-batches
    (4, 4, ["--gas", 1]),                                 # fewer micro-batches than stages
    (3, 3, ["--gas", 3, "--schedule", "fill_drain"]),     # GPipe
    (4, 2, ["--zero", 1]),                                # pipe 2 x data 2, ZeRO-1
    (4, 2, ["--zero", 2, "--gas", 3]),                    # pipe 2 x data 2, ZeRO-2 (DeepSpeed refuses it)
    (4, 4, ["--clip", 0.05]),                             # clipping by the whole model's norm
    (2, 2, ["--partition", "uniform", "--checkpoint_interval", 2]),
    (3, 3, ["--partition", "type:linear", "--gas", 10]),
    (2, 2, ["--chunks", 2, "--gas", 4]),                  # interleaved 1F1B, 2 chunks per stage
    (4, 4, ["--chunks", 2, "--gas", 8]),                  # interleaved, 4 stages, one layer per chunk
    (4, 2, ["--chunks", 2, "--gas", 4, "--zero", 2]),     # interleaved x data 2, ZeRO-2
    (1, 1, ["--chunks", 2, "--gas", 2]),                  # one stage holding both chunks
])
def test_pipeline_matches_torch(ranks, stages, args):
    _pipe(ranks, stages, *args)


def test_pipeline_with_data_parallel_and_zero2_on_8_ranks():
    _pipe(8, 4, "--zero", 2, timeout=400)


@pytest.mark.parametrize("ranks,args", [(4, []), (8, ["--zero", 1]), (4, ["--clip", 0.05])])
def test_3d_pipeline_tensor_data(ranks, args):
    # pipe 2 x tensor 2 (x data 2 with ZeRO-1 on 8 ranks): layers 2 and 5 column- and row-parallel
    # inside the stages; the same losses and weights (shards: their slices) as one torch process.
    _pipe(ranks, 2, "--tensor", 2, *args, timeout=400)


@pytest.mark.parametrize("ranks,stages,args", [(1, 1, []), (2, 2, []), (3, 3, []), (4, 2, ["--zero", 1]),
                                               (2, 2, ["--clip", 0.3])])
def test_tied_embedding_across_stages_matches_torch(ranks, stages, args):
    # TiedLayerSpec: the embedding on the first stage is the output head on the last. Both copies
    # start equal (seeded by the first occurrence), their gradients are summed before each step,
    # and the norm counts them once: the losses and both copies follow one torch model.
    proc = run_mpi(ranks, "pipe_tied.py", "--stages", stages, *args, timeout=240)
    assert proc.stdout.count("TIED-OK") == ranks, proc.stdout + proc.stderr


def test_a_stage_that_raises_stops_every_rank_within_the_timeout():
    # Stage 1 of 3 raises in its forward at step 2; its neighbours wait for its messages and give up
    # after comms_timeout_s (5 s) with a TimeoutError that names the op and the missing rank.
    import time

    start = time.monotonic()
    proc = run_mpi(3, "pipe_train.py", "--stages", 3, "--raise_at", "2:1", "--timeout", 5, timeout=120, check=False)
    elapsed = time.monotonic() - start
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "injected failure in stage 1 at step 2" in out
    assert "TimeoutError" in out and "did not arrive: [1]" in out, out[-3000:]
    assert elapsed < 60, elapsed


def test_pipeline_config_errors():
    import zeal

    with pytest.raises(zeal.ConfigError, match="'pipeline'.*PipelineModule"):
        zeal.initialize(model=torch.nn.Linear(2, 2), config={"train_micro_batch_size_per_gpu": 1,
                                                             "optimizer": {"type": "Adam"},
                                                             "pipeline": {"schedule": "1f1b"}})


@pytest.mark.parametrize("saved,loaded", [
    ((2, 2, ["--gas", 4]), (2, 1, ["--gas", 2])),                        # (pipe 2, data 1) -> (1, 2)
    ((2, 2, ["--gas", 4]), (4, 4, ["--gas", 4, "--zero", 2])),           # -> (4, 1), ZeRO 0 -> 2
    ((4, 2, ["--gas", 2, "--zero", 1]), (4, 1, ["--gas", 1, "--zero", 2])),  # (2, 2) ZeRO-1 -> (1, 4) ZeRO-2
    ((4, 2, ["--gas", 2, "--zero", 1]), (3, 3, ["--gas", 4])),           # -> (3, 1), ZeRO 0
    ((4, 2, ["--gas", 2, "--zero", 1]), (2, 2, ["--gas", 4, "--chunks", 2])),  # -> interleaved, 2 x 2 chunks
    # 3D, (pipe, tensor, data): the two moves, and tensor 2 -> 4 with ZeRO 0 -> 2
    ((4, 2, ["--tensor", 2, "--gas", 4]), (4, 1, ["--gas", 1])),                 # (2, 2, 1) -> (1, 1, 4)
    ((4, 1, ["--tensor", 2, "--gas", 2]), (4, 2, ["--gas", 2])),                 # (1, 2, 2) -> (2, 1, 2)
    ((4, 2, ["--tensor", 2, "--gas", 4]), (4, 1, ["--tensor", 4, "--gas", 4, "--zero", 2])),  # -> (1, 4, 1)
    ((8, 2, ["--tensor", 2, "--gas", 2, "--zero", 1]),                          # (2, 2, 2) ZeRO-1 ->
     (4, 2, ["--tensor", 2, "--gas", 4, "--chunks", 2])),                      # (2, 2, 1) interleaved
])
def test_pipeline_checkpoint_moves_between_layouts(tmp_path, saved, loaded):
    # Saved after 6 steps at one (pipe, tensor, data, ZeRO) layout, loaded at another with the same
    # global batch, 4 more steps: every loss after the move and the final weights equal the
    # uninterrupted torch run's (1e-5), optimizer state included. Parameters are named by layer,
    # not by stage; each part reshards over its data group as any Zeal checkpoint does, and
    # tensor-parallel slices are cut anew from the saved ones.
    ranks, stages, args = saved
    proc = run_mpi(ranks, "pipe_train.py", "--stages", stages, *args, "--save_at", 6, "--save_dir", tmp_path,
                   timeout=240)
    assert proc.stdout.count("SAVED step 6") == ranks, proc.stdout + proc.stderr
    ranks, stages, args = loaded
    _pipe(ranks, stages, "--load", tmp_path, *args, timeout=400)


@pytest.mark.parametrize("args", [["--gas", 2, "--zero", 1], ["--tensor", 2, "--gas", 4]])
def test_zeal_to_fp32_reads_a_pipeline_checkpoint(tmp_path, args):
    # The parts together (stages; stages x tensor ranks) give every parameter once, whole, under
    # its layer name, equal to the single-process model after the same 6 steps.
    import sys

    from conftest import RANKS
    from zeal.checkpoint import to_fp32_file, to_fp32_state_dict

    proc = run_mpi(4, "pipe_train.py", "--stages", 2, *args, "--save_at", 6, "--save_dir", tmp_path / "ckpt",
                   timeout=240)
    assert proc.stdout.count("SAVED step 6") == 4, proc.stdout + proc.stderr
    sys.path.insert(0, str(RANKS))
    import pipe_train

    built, _ = pipe_train.reference(6, 2 * 2 * 2, 0.0)
    want = {f"layer{i}.{name}": p for i, layer in enumerate(built) if isinstance(layer, torch.nn.Module)
            for name, p in layer.named_parameters()}
    got = to_fp32_state_dict(tmp_path / "ckpt")
    assert sorted(got) == sorted(want)
    for name, w in want.items():
        assert ((got[name] - w.detach()).abs().max() / w.detach().abs().max()).item() <= 1e-5, name
    to_fp32_file(tmp_path / "ckpt", tmp_path / "model.safetensors")
    written = _zeal.read_safetensors(str(tmp_path / "model.safetensors"))
    assert sorted(written) == sorted(want)
    for name, w in want.items():
        assert torch.equal(written[name], got[name]), name
