"""Launchers: the exact TPU and SLURM commands (dry runs), and launch.local with small children."""

import signal
import subprocess
import sys
from pathlib import Path

import pytest

from launch import local, slurm, tpu

REPO = Path(__file__).resolve().parents[1]
PRETRAIN = ["python", "-m", "pretrain", "--config", "configs/bert_base.py",
            "--workdir", "/mnt/runs/bert_base"]


def test_tpu_dry_run_v4_32(capsys):
    assert tpu.main(["--name", "bert-base", "--zone", "us-central2-b", "--accelerator", "v4-32",
                     "--project", "my-project", "--ref", "HEAD", "--dry_run", "--", *PRETRAIN]) == 0
    where = "--zone=us-central2-b --project=my-project"
    ssh = f"gcloud compute tpus tpu-vm ssh bert-base {where}"
    assert capsys.readouterr().out.splitlines() == [
        "# 1. reuse the slice if it exists",
        f"gcloud compute tpus tpu-vm describe bert-base {where} '--format=value(state)'",
        "# 2. create the slice (4 workers) (only when describe finds no slice)",
        f"gcloud compute tpus tpu-vm create bert-base {where} --accelerator-type=v4-32 "
        "--version=tpu-ubuntu2204-base",
        "# 3. pack the code",
        "git archive --format=tar.gz --output=/tmp/pretrax-bert-base.tar.gz HEAD",
        "# 4. copy it to every worker",
        "gcloud compute tpus tpu-vm scp /tmp/pretrax-bert-base.tar.gz 'bert-base:~/pretrax.tar.gz' "
        f"--worker=all {where}",
        "# 5. install it on every worker",
        f"{ssh} --worker=all '--command=mkdir -p ~/pretrax && tar -xzf ~/pretrax.tar.gz -C "
        "~/pretrax && cd ~/pretrax && ([ -d .venv ] || python3 -m venv .venv) && .venv/bin/pip "
        "install -q -U pip && .venv/bin/pip install -q -e '\"'\"'.[tpu]'\"'\"''",
        "# 6. start the command on every worker",
        f"{ssh} --worker=all '--command=cd ~/pretrax && . .venv/bin/activate && rm -f "
        "~/pretrax-run.pid ~/pretrax-run.status && nohup bash -c '\"'\"'python -m pretrain "
        "--config configs/bert_base.py --workdir /mnt/runs/bert_base > ~/pretrax-run.log 2>&1 & "
        "echo $! > ~/pretrax-run.pid; wait $!; echo $? > ~/pretrax-run.status'\"'\"' > /dev/null "
        "2>&1 < /dev/null &'",
        "# 7. stream worker 0's log until the run ends",
        f"{ssh} --worker=0 '--command=while [ ! -s ~/pretrax-run.pid ]; do sleep 1; done; "
        "tail -n +1 -F ~/pretrax-run.log --pid=$(cat ~/pretrax-run.pid)'",
        "# 8. every worker's exit status",
        f"{ssh} --worker=all '--command=cat ~/pretrax-run.status'",
        "# 9. on Ctrl-C: SIGTERM to the run on every worker (it saves and exits)",
        f"{ssh} --worker=all '--command=kill -TERM $(cat ~/pretrax-run.pid)'",
    ]


def test_tpu_pod_sizes_and_runtimes():
    assert [tpu.num_workers(a) for a in ("v4-8", "v4-32", "v5p-128", "v5litepod-8",
                                         "v5litepod-16", "v6e-64")] == [1, 4, 16, 1, 4, 16]
    plan = tpu.Plan(type("A", (), dict(name="x", zone="z", project=None, accelerator="v6e-16",
                                       version=None, spot=True, delete=True))(), ["true"])
    assert plan.create().argv[-2:] == ["--version=v2-alpha-tpuv6e", "--spot"]
    assert plan.steps("HEAD")[-1].argv == ["gcloud", "compute", "tpus", "tpu-vm", "delete", "x",
                                           "--zone=z", "--quiet"]


def test_slurm_dry_run_two_nodes_of_8_gpus(capsys):
    assert slurm.main(["--nodes", "2", "--gpus_per_node", "8", "--partition", "gpu",
                       "--time", "12:00:00", "--repo", "/shared/pretrax", "--dry_run", "--",
                       *PRETRAIN]) == 0
    out = capsys.readouterr().out
    assert out.startswith("sbatch --parsable <<'EOF'\n#!/bin/bash\n") and out.endswith("\nEOF\n")
    script = out.split("\n", 1)[1].rsplit("EOF\n", 1)[0]
    directives = [line for line in script.splitlines() if line.startswith("#SBATCH")]
    assert directives == [
        "#SBATCH --job-name=pretrax", "#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=8",
        "#SBATCH --gpus-per-node=8", "#SBATCH --cpus-per-task=8", "#SBATCH --time=12:00:00",
        "#SBATCH --signal=TERM@120", "#SBATCH --requeue", "#SBATCH --open-mode=append",
        "#SBATCH --output=slurm-%x-%j.out", "#SBATCH --partition=gpu"]
    body = [line for line in script.splitlines() if line and not line.startswith("#")]
    assert body == [
        "set -euo pipefail", "cd /shared/pretrax", "source /shared/pretrax/.venv/bin/activate",
        "export JAX_COORDINATOR_PORT=8476",
        "srun --kill-on-bad-exit=1 python -m pretrain --config configs/bert_base.py "
        "--workdir /mnt/runs/bert_base"]
    assert "{{" not in script


def test_slurm_one_task_per_node_sees_every_gpu(capsys):
    slurm.main(["--nodes", "4", "--gpus_per_node", "4", "--one_task_per_node", "--repo", "/r",
                "--dry_run", "--", "python", "-m", "pretrain"])
    script = capsys.readouterr().out
    assert "#SBATCH --ntasks-per-node=1\n" in script and "#SBATCH --gpus-per-node=4\n" in script
    assert "export JAX_LOCAL_DEVICE_IDS=0,1,2,3" in script


# ---------------------------------------------------------------------------------------------
# launch.local with plain Python children (no JAX): flags, prefixes, failures, signals
# ---------------------------------------------------------------------------------------------

CHILD = """
import signal, sys, time
args = sys.argv[1:]
pid = int(args[args.index("--process_id") + 1])
print(f"args {' '.join(args)}", flush=True)
if "fail" in args and pid == 1:
    sys.exit(3)
if "wait" in args:
    signal.signal(signal.SIGTERM, lambda *a: (print("got SIGTERM", flush=True), sys.exit(0)))
    print("waiting", flush=True)
    time.sleep(60)
    sys.exit(1)
"""


def launch(*child_args, n=2, grace="30"):
    return [sys.executable, "-m", "launch.local", "--num_processes", str(n), "--devices_per_process",
            "4", "--grace", grace, "--port", "5555", "--", sys.executable, "-c", CHILD, *child_args]


def test_local_passes_flags_and_prefixes_output():
    r = subprocess.run(launch("x"), cwd=REPO, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    for i in (0, 1):
        assert (f"[{i}] args x --coordinator localhost:5555 --num_processes 2 --process_id {i} "
                f"--cpu_devices 4\n") in r.stdout


def test_local_fails_when_one_process_fails():
    r = subprocess.run(launch("fail", "wait", grace="0.5"), cwd=REPO, capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 3, r.stdout  # process 1's status; process 0 was killed after the grace
    assert "process 1 failed (exit status 3)" in r.stdout and "killing process 0" in r.stdout


def test_local_forwards_sigterm_to_every_process():
    p = subprocess.Popen(launch("wait"), cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        seen = []
        while sum("waiting" in line for line in seen) < 2:
            seen.append(p.stdout.readline())
            assert seen[-1], "".join(seen)
        p.send_signal(signal.SIGTERM)
        out = "".join(seen) + p.stdout.read()
        assert p.wait(timeout=30) == 0, out
    finally:
        if p.poll() is None:
            p.kill()
    assert "[0] got SIGTERM" in out and "[1] got SIGTERM" in out


def test_local_needs_a_command(capsys):
    with pytest.raises(SystemExit) as e:
        local.main(["--num_processes", "2"])
    assert e.value.code == 2
    assert "no command after --" in capsys.readouterr().err


def test_process_commands():
    assert local.process_commands(["prog"], 2, None, 99) == [
        ["prog", "--coordinator", "localhost:99", "--num_processes", "2", "--process_id", "0"],
        ["prog", "--coordinator", "localhost:99", "--num_processes", "2", "--process_id", "1"]]
