"""The one metrics sink: JSONL always, TensorBoard, W&B when configured; process 0 writes.

A bucket object cannot be appended to (and takes about one write a second): in a gs:// workdir
`metrics.jsonl` is rewritten whole at most every `FLUSH_SECONDS` and when the writer closes.
"""

import json
import math
import time

import jax
import numpy as np

from training import storage
from training.plots import save_png

FLUSH_SECONDS = 10.0


class MetricsWriter:
    def __init__(self, workdir, wandb_project: str = "", run_name: str = "", config=None,
                 after_step: int = 0):
        """`after_step`: the step a resumed run starts from; later lines of a killed run go."""
        self.enabled = jax.process_index() == 0
        self._jsonl = self._tb = self._wandb = None
        if not self.enabled:
            return
        workdir = self._workdir = storage.as_path(workdir)
        self._path = workdir / "metrics.jsonl"
        kept = [line for line in read_metrics(workdir) if line["step"] <= after_step]
        self._lines = [json.dumps(line) + "\n" for line in kept]
        self._path.write_text("".join(self._lines))
        self._flushed = time.monotonic()
        if not storage.is_remote(workdir):
            self._jsonl = open(self._path, "a", buffering=1)
        from tensorboardX import SummaryWriter  # imported late: it is slow to import
        self._tb = SummaryWriter(str(workdir / "tensorboard"))
        if wandb_project:
            import wandb
            self._wandb = wandb.init(project=wandb_project, name=run_name or workdir.name,
                                     config=config, dir=str(workdir), resume="allow")

    def write(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled or not metrics:
            return
        metrics = {k: float(v) for k, v in metrics.items()}
        line = json.dumps({"step": int(step), **metrics}) + "\n"
        if self._jsonl:
            self._jsonl.write(line)
        else:
            self._lines.append(line)
            if time.monotonic() - self._flushed >= FLUSH_SECONDS:
                self.flush()
        for k, v in metrics.items():
            if math.isfinite(v):
                self._tb.add_scalar(k, v, step)
        if self._wandb is not None:
            self._wandb.log(metrics, step=step)

    def image(self, step: int, name: str, image_HWC) -> None:
        """An HWC picture in [0, 1]: workdir/<name>.png (the latest) and TensorBoard (every one)."""
        if not self.enabled:
            return
        image_HWC = np.clip(np.asarray(image_HWC, np.float32), 0.0, 1.0)
        self._tb.add_image(name, image_HWC, step, dataformats="HWC")
        save_png(self._workdir / f"{name}.png", image_HWC)

    def flush(self) -> None:
        """Rewrite a bucket's metrics.jsonl with every line so far (a local one is line-buffered)."""
        if self.enabled and not self._jsonl:
            self._path.write_text("".join(self._lines))
            self._flushed = time.monotonic()

    def close(self) -> None:
        if self._jsonl:
            self._jsonl.close()
        elif self.enabled:
            self.flush()
        if self._tb:
            _close_tensorboard(self._tb)
        if self._wandb:
            self._wandb.finish()


def _close_tensorboard(writer) -> None:
    """Close a tensorboardX SummaryWriter. When its last flush fails (a full disk), stop its
    thread and mark it closed before raising: else its atexit hook fails again, with tracebacks."""
    file_writers = list((writer.all_writers or {}).values())  # `close` forgets them
    try:
        writer.close()
    except OSError:
        for file_writer in file_writers:
            events = file_writer.event_writer
            if not events._closed:
                events._worker.stop()
                events._closed = True
        raise
    finally:
        for file_writer in file_writers:
            _settle_bucket_file(file_writer)


def _settle_bucket_file(file_writer) -> None:
    """tensorboardX's gs:// event file uploads its whole buffer again on every `close`, and its
    `__del__` closes it again: at exit, after the run, that upload retries for minutes when the
    bucket is gone. A closed file has uploaded everything, so its later closes do nothing."""
    events = getattr(file_writer.event_writer, "_ev_writer", None)
    record_file = getattr(getattr(events, "_py_recordio_writer", None), "_writer", None)
    if record_file is not None and hasattr(record_file, "blob"):  # a GCSRecordWriter
        record_file.close = lambda: None


def read_metrics(workdir) -> list[dict]:
    path = storage.as_path(workdir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
