"""Submit a multi-node GPU run to SLURM: render launch/slurm.sbatch and pipe it to `sbatch`.

    python -m launch.slurm --nodes 2 --gpus_per_node 8 [--partition P] [--account A] \\
        [--time 24:00:00] [--one_task_per_node] [--dry_run] -- python -m pretrain --config ...

One task per GPU by default (each JAX process drives one GPU); --one_task_per_node runs one
process per node driving all its GPUs. The repository and its venv must be on a filesystem the
nodes share (the default is this checkout), and so must the run's workdir. `--dry_run` prints the
sbatch command and the rendered script and submits nothing.
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
from pathlib import Path

TEMPLATE = Path(__file__).with_name("slurm.sbatch")
REPO = Path(__file__).resolve().parents[1]


def render(args, command: list[str]) -> str:
    tasks = 1 if args.one_task_per_node else args.gpus_per_node
    extra = []
    if args.partition:
        extra.append(f"#SBATCH --partition={args.partition}")
    if args.account:
        extra.append(f"#SBATCH --account={args.account}")
    local_devices = ""
    if args.one_task_per_node:  # else JAX gives each task the one GPU SLURM_LOCALID
        ids = ",".join(str(i) for i in range(args.gpus_per_node))
        local_devices = f"export JAX_LOCAL_DEVICE_IDS={ids}  # one process drives every GPU"
    fields = {
        "JOB_NAME": args.job_name, "NODES": args.nodes, "TASKS_PER_NODE": tasks,
        "GPUS_PER_NODE": args.gpus_per_node, "CPUS_PER_TASK": args.cpus_per_task,
        "TIME": args.time, "SIGNAL_SECONDS": args.signal_seconds, "OUTPUT": args.output,
        "EXTRA_SBATCH": "\n".join(extra), "REPO": shlex.quote(str(args.repo)),
        "VENV": shlex.quote(str(args.venv or Path(args.repo) / ".venv")), "PORT": args.port,
        "LOCAL_DEVICES": local_devices, "COMMAND": shlex.join(command),
    }
    lines = []
    for line in TEMPLATE.read_text().splitlines():
        if line.strip() in ("{{EXTRA_SBATCH}}", "{{LOCAL_DEVICES}}") and not fields[line.strip()[2:-2]]:
            continue  # an empty field that stands on a line of its own
        for key, value in fields.items():
            line = line.replace("{{" + key + "}}", str(value))
        lines.append(line)
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    split = argv.index("--") if "--" in argv else len(argv)
    parser = argparse.ArgumentParser(prog="python -m launch.slurm", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nodes", type=int, required=True)
    parser.add_argument("--gpus_per_node", type=int, default=8)
    parser.add_argument("--one_task_per_node", action="store_true",
                        help="one process per node driving all its GPUs (default: one per GPU)")
    parser.add_argument("--cpus_per_task", type=int, default=8)
    parser.add_argument("--partition", default=None)
    parser.add_argument("--account", default=None)
    parser.add_argument("--time", default="24:00:00", help="time limit (default 24:00:00)")
    parser.add_argument("--signal_seconds", type=int, default=120,
                        help="SIGTERM this long before the time limit (default 120)")
    parser.add_argument("--job_name", default="pretrax")
    parser.add_argument("--output", default="slurm-%x-%j.out", help="sbatch --output pattern")
    parser.add_argument("--port", type=int, default=8476, help="coordinator port on the first node")
    parser.add_argument("--repo", default=str(REPO), help="the code, on a shared filesystem")
    parser.add_argument("--venv", default=None, help="default: REPO/.venv")
    parser.add_argument("--dry_run", action="store_true",
                        help="print the sbatch command and the script, submit nothing")
    args = parser.parse_args(argv[:split])
    command = argv[split + 1:]
    if not command:
        parser.error("give the command to run after --, e.g. -- python -m pretrain --config ...")
    if args.nodes < 1 or args.gpus_per_node < 1:
        parser.error("--nodes and --gpus_per_node must be at least 1")
    script = render(args, command)
    sbatch = ["sbatch", "--parsable"]
    if args.dry_run:
        print(f"{shlex.join(sbatch)} <<'EOF'\n{script}EOF")
        return 0
    result = subprocess.run(sbatch, input=script, text=True, capture_output=True)
    if result.returncode != 0:
        print(f"error: sbatch failed: {result.stderr.strip()}", file=sys.stderr)
        return 1
    print(f"submitted job {result.stdout.strip()}; log: {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
