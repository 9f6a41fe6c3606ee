"""Run a command on every worker of a Cloud TPU VM slice, with gcloud.

    python -m launch.tpu --name bert-base --zone us-central2-b --accelerator v4-32 \\
        [--project P] [--spot] [--dry_run] -- python -m pretrain --config configs/bert_base.py ...

Steps: create the slice unless `describe` finds it (then it is reused); pack the code (`git
archive` of the working tree's tracked files, or of --ref); copy it to every worker; install it
in a venv with `jax[tpu]`; start the command on all workers at once (`--worker=all`: every host
runs one process and jax.distributed finds the others by itself); stream worker 0's log until
the run ends; check every worker's exit status. Ctrl-C or SIGTERM sends SIGTERM to the run on
every worker, which saves a checkpoint and exits; the log keeps streaming until it has.
`--delete` deletes the slice afterwards. `--dry_run` prints the gcloud commands and runs nothing.

The workdir must be on storage every worker sees at the same path (a bucket mounted with gcsfuse,
or NFS): Orbax writes each host's shards of one checkpoint into the same folder.
"""

from __future__ import annotations

import argparse
import shlex
import signal
import subprocess
import sys
from dataclasses import dataclass

CODE_DIR = "~/pretrax"          # on each worker
LOG = "~/pretrax-run.log"
PID = "~/pretrax-run.pid"
STATUS = "~/pretrax-run.status"

# Runtime (--version) per TPU generation.
RUNTIME_VERSIONS = {
    "v2": "tpu-ubuntu2204-base", "v3": "tpu-ubuntu2204-base", "v4": "tpu-ubuntu2204-base",
    "v5litepod": "v2-alpha-tpuv5-lite", "v5p": "v2-alpha-tpuv5", "v6e": "v2-alpha-tpuv6e",
}


def generation(accelerator: str) -> str:
    gen, sep, size = accelerator.rpartition("-")
    if not sep or gen not in RUNTIME_VERSIONS or not size.isdigit():
        raise SystemExit(f"error: unknown --accelerator {accelerator!r}; expected "
                         f"<generation>-<size> with generation in {sorted(RUNTIME_VERSIONS)}, "
                         f"e.g. v4-32")
    return gen


def num_workers(accelerator: str) -> int:
    """Hosts in a slice: v2-v4 and v5p count TensorCores (8 per host), v5e/v6e count chips
    (one host up to 8 chips, else 4 per host)."""
    gen = generation(accelerator)
    size = int(accelerator.rpartition("-")[2])
    if gen in ("v5litepod", "v6e"):
        return 1 if size <= 8 else size // 4
    return max(1, size // 8)


@dataclass
class Step:
    what: str
    argv: list[str]
    local: bool = False  # runs here, not through gcloud


class Plan:
    def __init__(self, args, command: list[str]):
        self.args = args
        self.command = command
        self.archive = f"/tmp/pretrax-{args.name}.tar.gz"
        self.version = args.version or RUNTIME_VERSIONS[generation(args.accelerator)]

    def _where(self) -> list[str]:
        where = [f"--zone={self.args.zone}"]
        if self.args.project:
            where.append(f"--project={self.args.project}")
        return where

    def gcloud(self, verb: str, *rest: str) -> list[str]:
        return ["gcloud", "compute", "tpus", "tpu-vm", verb, self.args.name, *self._where(), *rest]

    def ssh(self, worker: str, command: str) -> list[str]:
        return self.gcloud("ssh", f"--worker={worker}", f"--command={command}")

    def describe(self) -> Step:
        return Step("reuse the slice if it exists", self.gcloud("describe", "--format=value(state)"))

    def create(self) -> Step:
        extra = ["--spot"] if self.args.spot else []
        return Step(f"create the slice ({num_workers(self.args.accelerator)} workers)",
                    self.gcloud("create", f"--accelerator-type={self.args.accelerator}",
                                f"--version={self.version}", *extra))

    def pack(self, ref: str) -> Step:
        return Step("pack the code", ["git", "archive", "--format=tar.gz",
                                      f"--output={self.archive}", ref], local=True)

    def copy(self) -> Step:
        return Step("copy it to every worker",
                    ["gcloud", "compute", "tpus", "tpu-vm", "scp", self.archive,
                     f"{self.args.name}:~/pretrax.tar.gz", "--worker=all", *self._where()])

    def install(self) -> Step:
        return Step("install it on every worker", self.ssh("all", (
            f"mkdir -p {CODE_DIR} && tar -xzf ~/pretrax.tar.gz -C {CODE_DIR} && cd {CODE_DIR} && "
            f"([ -d .venv ] || python3 -m venv .venv) && .venv/bin/pip install -q -U pip && "
            f".venv/bin/pip install -q -e '.[tpu]'")))

    def start(self) -> Step:
        inner = (f"{shlex.join(self.command)} > {LOG} 2>&1 & echo $! > {PID}; wait $!; "
                 f"echo $? > {STATUS}")
        return Step("start the command on every worker", self.ssh("all", (
            f"cd {CODE_DIR} && . .venv/bin/activate && rm -f {PID} {STATUS} && "
            f"nohup bash -c {shlex.quote(inner)} > /dev/null 2>&1 < /dev/null &")))

    def stream(self) -> Step:
        return Step("stream worker 0's log until the run ends", self.ssh("0", (
            f"while [ ! -s {PID} ]; do sleep 1; done; tail -n +1 -F {LOG} --pid=$(cat {PID})")))

    def status(self) -> Step:
        return Step("every worker's exit status", self.ssh("all", f"cat {STATUS}"))

    def stop(self) -> Step:
        return Step("on Ctrl-C: SIGTERM to the run on every worker (it saves and exits)",
                    self.ssh("all", f"kill -TERM $(cat {PID})"))

    def delete(self) -> Step:
        return Step("delete the slice", self.gcloud("delete", "--quiet"))

    def steps(self, ref: str) -> list[Step]:
        steps = [self.describe(), self.create(), self.pack(ref), self.copy(), self.install(),
                 self.start(), self.stream(), self.status(), self.stop()]
        return steps + ([self.delete()] if self.args.delete else [])


def working_tree_ref() -> str:
    """A commit of the working tree's tracked files (HEAD when nothing is modified)."""
    stash = subprocess.run(["git", "stash", "create"], capture_output=True, text=True, check=True)
    return stash.stdout.strip() or "HEAD"


def dry_run(plan: Plan, ref: str, out=None) -> None:
    out = out or sys.stdout
    for i, step in enumerate(plan.steps(ref), 1):
        note = " (only when describe finds no slice)" if step.what.startswith("create") else ""
        print(f"# {i}. {step.what}{note}", file=out)
        print(shlex.join(step.argv), file=out)


def run(plan: Plan, ref: str) -> int:
    def call(step: Step, **kwargs) -> subprocess.CompletedProcess:
        print(f"[launch.tpu] {step.what}: {shlex.join(step.argv)}", flush=True)
        return subprocess.run(step.argv, **kwargs)

    if call(plan.describe(), capture_output=True).returncode != 0:
        if call(plan.create()).returncode != 0:
            return 1
    for step in (plan.pack(ref), plan.copy(), plan.install(), plan.start()):
        if call(step).returncode != 0:
            return 1

    def stop(signum, frame):
        call(plan.stop())  # the stream below goes on until every process has saved and exited

    previous = {s: signal.signal(s, stop) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        # A session of its own: a terminal's Ctrl-C stops the run (above), not the stream.
        call(plan.stream(), start_new_session=True)
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
    status = call(plan.status(), capture_output=True, text=True)
    codes = [line.strip() for line in status.stdout.splitlines() if line.strip()]
    ok = status.returncode == 0 and codes and all(c == "0" for c in codes)
    print(f"[launch.tpu] exit statuses: {codes or 'unknown'}", flush=True)
    if plan.args.delete:
        call(plan.delete())
    return 0 if ok else 1


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    split = argv.index("--") if "--" in argv else len(argv)
    parser = argparse.ArgumentParser(prog="python -m launch.tpu", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--name", required=True, help="TPU VM name")
    parser.add_argument("--zone", required=True)
    parser.add_argument("--accelerator", required=True, help="slice type, e.g. v4-32, v5p-64, v6e-16")
    parser.add_argument("--project", default=None, help="default: gcloud's configured project")
    parser.add_argument("--version", default=None, help="TPU runtime (default: by generation)")
    parser.add_argument("--spot", action="store_true", help="create a Spot slice")
    parser.add_argument("--ref", default=None,
                        help="git ref to send (default: the working tree's tracked files)")
    parser.add_argument("--delete", action="store_true", help="delete the slice after the run")
    parser.add_argument("--dry_run", action="store_true", help="print the commands, run nothing")
    args = parser.parse_args(argv[:split])
    command = argv[split + 1:]
    if not command:
        parser.error("give the command to run after --, e.g. -- python -m pretrain --config ...")
    generation(args.accelerator)
    plan = Plan(args, command)
    ref = args.ref or working_tree_ref()
    if args.dry_run:
        dry_run(plan, ref)
        return 0
    return run(plan, ref)


if __name__ == "__main__":
    sys.exit(main())
