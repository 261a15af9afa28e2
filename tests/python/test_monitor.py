"""DeepSpeed's monitors: tensorboard and csv_monitor write DeepSpeed's Train/Samples events on
rank 0 only, one per optimizer step at x = global_samples, with the values the training saw
(read back from the TensorBoard event file and the CSV files)."""
import csv
import json

import pytest

from conftest import run_mpi

pytest.importorskip("tensorboard", reason="the tensorboard package is installed by scripts/install-deps")

TIMES = ["Train/Samples/elapsed_time_ms_forward", "Train/Samples/elapsed_time_ms_backward",
         "Train/Samples/elapsed_time_ms_step"]


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_monitors_write_deepspeeds_events_on_rank_0(tmp_path, precision, monkeypatch):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    try:
        import wandb  # noqa: F401
        with_wandb = True
        monkeypatch.setenv("WANDB_MODE", "offline")
        monkeypatch.setenv("WANDB_DIR", str(tmp_path))
        monkeypatch.setenv("WANDB_SILENT", "true")
    except ImportError:
        with_wandb = False
    run_mpi(2, "monitor_train.py", tmp_path, precision)
    expect = json.loads((tmp_path / "expect.json").read_text())
    assert [e["step"] for e in expect] == [8 * (i + 1) for i in range(5)]  # global_samples, batch 8
    want = {"Train/Samples/train_loss": "train_loss", "Train/Samples/lr": "lr"}
    if precision == "fp16":
        want["Train/Samples/loss_scale"] = "loss_scale"

    log_dir = tmp_path / "tb" / "run1"
    assert len(list(log_dir.glob("events.out.tfevents.*"))) == 1  # rank 0 alone writes
    events = EventAccumulator(str(log_dir))
    events.Reload()
    assert set(events.Tags()["scalars"]) == set(want) | set(TIMES)
    for tag, key in want.items():
        got = events.Scalars(tag)
        assert [e.step for e in got] == [e["step"] for e in expect], tag
        for e, w in zip(got, expect):
            assert abs(e.value - w[key]) <= 1e-6 * max(1.0, abs(w[key])), (tag, e.value, w[key])
    lrs = [e.value for e in events.Scalars("Train/Samples/lr")]
    assert lrs == sorted(lrs) and lrs[0] < lrs[-1]  # the warmup moves it
    for tag in TIMES:
        assert all(e.value > 0 for e in events.Scalars(tag)), tag

    if with_wandb:  # an offline run, written by rank 0 alone; its records hold every event name
        runs = list((tmp_path / "wandb").glob("offline-run-*/run-*.wandb"))
        assert len(runs) == 1, runs
        data = runs[0].read_bytes()
        for tag in set(want) | set(TIMES):
            assert tag.encode() in data, tag
        assert b"zeal-monitor-test" in data

    csv_dir = tmp_path / "csv" / "run1"
    names = {p.name for p in csv_dir.iterdir()}
    assert names == {t.replace("/", "_") + ".csv" for t in set(want) | set(TIMES)}
    for tag, key in want.items():
        with open(csv_dir / (tag.replace("/", "_") + ".csv"), newline="") as f:
            rows = list(csv.reader(f))
        assert rows[0] == ["step", tag.rsplit("/", 1)[-1]]
        assert [int(r[0]) for r in rows[1:]] == [e["step"] for e in expect]
        for r, w in zip(rows[1:], expect):
            assert abs(float(r[1]) - w[key]) <= 1e-12 * max(1.0, abs(w[key])), (tag, r, w[key])


def test_comet_is_refused_and_monitor_keys_are_checked():
    import zeal

    base = {"train_micro_batch_size_per_gpu": 1}
    with pytest.raises(zeal.ConfigError, match="'comet.enabled': comet is not supported yet"):
        zeal._zeal.validate_config(json.dumps(dict(base, comet={"enabled": True})))
    with pytest.raises(zeal.ConfigError, match="tensorboard.job_nme"):
        zeal._zeal.validate_config(json.dumps(dict(base, tensorboard={"enabled": True, "job_nme": "x"})))
    with pytest.raises(zeal.ConfigError, match="'csv_monitor.output_path': expected a string"):
        zeal._zeal.validate_config(json.dumps(dict(base, csv_monitor={"enabled": True, "output_path": 3})))
    parsed = zeal._zeal.validate_config(json.dumps(dict(base, wandb={"enabled": True, "team": None},
                                                        tensorboard={"enabled": False})))
    assert parsed.monitors == {"wandb": {"team": "", "group": "", "project": "deepspeed"}}
