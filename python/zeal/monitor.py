"""DeepSpeed's monitors (the config's tensorboard, csv_monitor and wandb sections): after each
optimizer step, rank 0 writes the step's events under DeepSpeed's names, x = global_samples:

    Train/Samples/train_loss   the mean of the losses backward got since the previous step (rank 0's)
    Train/Samples/lr           the first parameter group's learning rate, after the schedule moved it
    Train/Samples/loss_scale   fp16 only
    Train/Samples/elapsed_time_ms_{forward,backward,step}   with wall_clock_breakdown, summed
                                                            over the step's micro-batches

TensorBoard events go to output_path/job_name through torch.utils.tensorboard (the tensorboard
package); the CSV monitor writes one file per event there, `Train_Samples_lr.csv` with a
`step,lr` header; wandb runs wandb.init(project, group, entity=team) and wandb.log. The config is
parsed by the C++ Config (one owner of the keys and defaults); comet is refused there.
"""
import csv
import os


class TensorBoardMonitor:
    def __init__(self, output_path, job_name):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as e:
            raise ImportError("tensorboard monitor: install the tensorboard package (pip install tensorboard)") from e
        self.log_dir = os.path.join(output_path, job_name)
        os.makedirs(self.log_dir, exist_ok=True)
        self.writer = SummaryWriter(log_dir=self.log_dir)

    def write_events(self, events):
        for name, value, step in events:
            self.writer.add_scalar(name, value, step)
        self.writer.flush()

    def close(self):
        self.writer.close()


class CsvMonitor:
    def __init__(self, output_path, job_name):
        self.log_dir = os.path.join(output_path, job_name)
        os.makedirs(self.log_dir, exist_ok=True)
        self.started = set()

    def write_events(self, events):
        for name, value, step in events:
            filename = name.replace("/", "_").replace(" ", "_")
            with open(os.path.join(self.log_dir, filename + ".csv"), "a+", newline="") as f:
                writer = csv.writer(f)
                if filename not in self.started:
                    writer.writerow(["step", name.rsplit("/", 1)[-1]])
                    self.started.add(filename)
                writer.writerow([step, value])

    def close(self):
        pass


class WandbMonitor:
    def __init__(self, team, group, project):
        try:
            import wandb
        except ImportError as e:
            raise ImportError("wandb monitor: install the wandb package (pip install wandb)") from e
        self.wandb = wandb
        self.run = wandb.init(project=project, group=group or None, entity=team or None)

    def write_events(self, events):
        for name, value, step in events:
            self.wandb.log({name: value}, step=step)

    def close(self):
        self.run.finish()


class MonitorMaster:
    """The enabled monitors; only rank 0 builds writers (every rank knows whether any is on)."""

    def __init__(self, sections, rank):
        self.enabled = bool(sections)
        self.monitors = []
        if rank != 0:
            return
        if "tensorboard" in sections:
            self.monitors.append(TensorBoardMonitor(**sections["tensorboard"]))
        if "csv_monitor" in sections:
            self.monitors.append(CsvMonitor(**sections["csv_monitor"]))
        if "wandb" in sections:
            self.monitors.append(WandbMonitor(**sections["wandb"]))

    def write_events(self, events):
        for monitor in self.monitors:
            monitor.write_events(events)

    def close(self):
        for monitor in self.monitors:
            monitor.close()


def step_events(core, lr, fp16, wall_clock_breakdown):
    """The events of the step the engine just took (Engine::last_step_record)."""
    record, x = core.last_step_record, core.global_samples
    events = [("Train/Samples/train_loss", record["loss"], x), ("Train/Samples/lr", lr, x)]
    if fp16:
        events.append(("Train/Samples/loss_scale", core.loss_scale, x))
    if wall_clock_breakdown:
        events += [(f"Train/Samples/elapsed_time_ms_{part}", record[f"{part}_ms"], x)
                   for part in ("forward", "backward", "step")]
    return events
