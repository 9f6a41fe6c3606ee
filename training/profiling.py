"""`profile.steps=START:COUNT`: a jax.profiler trace of train steps START .. START+COUNT-1.

The trace goes to `workdir/profile/plugins/profile/steps_START_COUNT/` (a local or gs://
workdir alike: it is written to a local temporary folder, then copied), as `HOST.xplane.pb` for
XProf (`xprof server --logdir WORKDIR/profile`) or TensorBoard's profile plugin
(`tensorboard --logdir WORKDIR/profile`) and `HOST.trace.json.gz` for Perfetto (ui.perfetto.dev, Open
trace file). Process 0 traces unless `profile.all_processes` (then every process, each file named
`HOST-processI`). Each profiled step is a `StepTraceAnnotation` (the plugin's step view); the last
one is waited for before the trace stops. Tracing changes no value the steps compute.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import jax

from training import storage


def parse_steps(text: str) -> tuple[int, int] | None:
    """`START:COUNT` (checked by training/validate.py) as (START, COUNT); "" as None."""
    if not text:
        return None
    start, count = text.split(":")
    return int(start), int(count)


class Profiler:
    """What the run loop calls: `run_step(step, fn)` for every step, `close()` at the end."""

    def __init__(self, config, workdir):
        profile = config.get("profile") or {}
        span = parse_steps(profile.get("steps", ""))
        mine = jax.process_index() == 0 or profile.get("all_processes", False)
        self._span = span if mine else None
        self._workdir = workdir
        self._local = None  # the temporary folder of a running trace

    def run_step(self, step: int, fn):
        """`fn()` (fetching the batch and running the step) as train step `step` (counted from
        1), traced inside the window."""
        if self._span is None or not self._span[0] <= step < sum(self._span):
            return fn()
        if self._local is None:
            self._local = tempfile.TemporaryDirectory(prefix="pretrax-profile-")
            jax.profiler.start_trace(self._local.name)
        with jax.profiler.StepTraceAnnotation("train", step_num=step):
            out = fn()
        if step == sum(self._span) - 1:
            jax.block_until_ready(out)
            self.close()
        return out

    def close(self) -> None:
        """Stop a running trace (the last profiled step, or a run that ends inside the window)
        and copy its files into the workdir."""
        if self._local is None:
            return
        jax.profiler.stop_trace()
        start, count = self._span
        dest = storage.as_path(self._workdir) / "profile" / "plugins" / "profile" / \
            f"steps_{start}_{count}"
        dest.mkdir(parents=True, exist_ok=True)
        suffix = f"-process{jax.process_index()}" if jax.process_count() > 1 else ""
        for file in sorted(Path(self._local.name).glob("plugins/profile/*/*")):
            host, _, kind = file.name.partition(".")
            (dest / f"{host}{suffix}.{kind}").write_bytes(file.read_bytes())
        self._local.cleanup()
        self._local = None
        print(f"profile of steps {start}-{start + count - 1} in {dest}")
