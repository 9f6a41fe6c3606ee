"""Joining the processes of a multi-host run into one JAX runtime (`jax.distributed`).

`initialize(coordinator, num_processes, process_id, cpu_devices)` must run before anything touches
a JAX backend. With no flags it joins a cluster only where one is detected (a multi-host TPU slice,
or `srun` with more than one task); a plain single-process run never calls
`jax.distributed.initialize` (it would wait for peers that never come). With the three flags it
joins exactly that runtime. On CPU the processes talk through gloo, and `cpu_devices` fakes that
many devices per process.

The trainers take the flags from `DISTRIBUTED_ARGS` (argparse specs for `parse_cli`).

When one process of a run fails, the others must not wait for it: JAX's coordination service
sees a lost process by its missing heartbeats (`heartbeat_timeout_s`, from the config group
`distributed`) and processes that end wait at most `shutdown_timeout_s` for each other. A
process that stops with an error leaves at once (`leave`: JAX's shutdown would wait for peers
that may be gone); a process whose peer is lost says which one (`lost_processes`).
"""

from __future__ import annotations

import os
import sys
import threading

from training.errors import UserError

DISTRIBUTED_ARGS = [
    ("--coordinator", dict(default=None, metavar="HOST:PORT",
                           help="address of process 0's coordinator, the same on every process "
                                "(multi-process runs; auto-detected on TPU pods and under srun)")),
    ("--num_processes", dict(type=int, default=None, help="number of processes in the run")),
    ("--process_id", dict(type=int, default=None, help="this process's index, 0..num_processes-1")),
    ("--cpu_devices", dict(type=int, default=None, metavar="N",
                           help="fake N CPU devices in this process (CPU backend only; for "
                                "testing meshes and multi-process runs on one machine)")),
]

# A lost process stops the job within about a minute (JAX's defaults: 100 s and 300 s).
HEARTBEAT_TIMEOUT_S = 30
SHUTDOWN_TIMEOUT_S = 60

_joined = False  # this process is one of several in a JAX runtime
_heartbeat_timeout_s = HEARTBEAT_TIMEOUT_S  # as given to the runtime

# Cluster environments JAX can read its runtime from (names of jax's ClusterEnv classes).
AUTO_DETECTED = ("slurm", "gce_tpu", "gke_tpu")


def detect_cluster() -> tuple[str, int] | None:
    """(JAX cluster name, process count) where a multi-process TPU or SLURM launch is detected."""
    try:
        from jax._src import clusters  # the same detection jax.distributed.initialize() runs
    except ImportError:  # pragma: no cover - private API moved
        return None
    for env in clusters.ClusterEnv._cluster_types:
        if env.name in AUTO_DETECTED and env.is_env_present():
            count = env.get_process_count()
            if count > 1:
                return env.name, count
    return None


def check_flags(coordinator: str | None, num_processes: int | None, process_id: int | None,
                cpu_devices: int | None = None) -> None:
    """One-line UserErrors for flags that cannot describe a run."""
    given = {"--coordinator": coordinator, "--num_processes": num_processes,
             "--process_id": process_id}
    missing = [k for k, v in given.items() if v is None]
    if 0 < len(missing) < 3:
        raise UserError(f"pass --coordinator, --num_processes and --process_id together "
                        f"(missing {', '.join(missing)}), or none of them to auto-detect a TPU "
                        f"pod or SLURM job")
    if num_processes is not None and num_processes < 1:
        raise UserError(f"--num_processes={num_processes} must be at least 1")
    if process_id is not None and not 0 <= process_id < num_processes:
        raise UserError(f"--process_id={process_id} must be in 0..{num_processes - 1} "
                        f"(--num_processes={num_processes})")
    if coordinator is not None:
        host, sep, port = coordinator.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise UserError(f"--coordinator={coordinator!r} must be HOST:PORT, e.g. "
                            f"10.0.0.1:8476 (process 0's address, the same on every process)")
    if cpu_devices is not None and cpu_devices < 1:
        raise UserError(f"--cpu_devices={cpu_devices} must be at least 1")


def timeouts(config) -> dict[str, int]:
    """`initialize`'s timeouts from a config's `distributed` group (defaults where absent)."""
    group = config.get("distributed") or {}
    return {"heartbeat_timeout_s": int(group.get("heartbeat_timeout_s", HEARTBEAT_TIMEOUT_S)),
            "shutdown_timeout_s": int(group.get("shutdown_timeout_s", SHUTDOWN_TIMEOUT_S))}


def initialize(coordinator: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, cpu_devices: int | None = None,
               heartbeat_timeout_s: int = HEARTBEAT_TIMEOUT_S,
               shutdown_timeout_s: int = SHUTDOWN_TIMEOUT_S) -> bool:
    """Join the multi-process runtime if there is one; True if this run is multi-process.

    Call before any JAX computation (or `jax.devices()`): both the runtime and the fake CPU
    device count are fixed when the backend starts.
    """
    global _joined, _heartbeat_timeout_s
    import jax  # here, not at the top: `--help` of the CLIs stays instant

    check_flags(coordinator, num_processes, process_id, cpu_devices)
    if cpu_devices is not None:
        jax.config.update("jax_num_cpu_devices", cpu_devices)
    if coordinator is not None:
        kwargs = dict(coordinator_address=coordinator, num_processes=num_processes,
                      process_id=process_id,
                      # Explicit flags win: no SLURM/TPU environment may override them.
                      cluster_detection_method="deactivate")
    else:
        detected = detect_cluster()
        if detected is None:
            return False  # a plain single-process run
        kwargs = dict(cluster_detection_method=detected[0])
        num_processes = detected[1]
    kwargs.update(heartbeat_timeout_seconds=heartbeat_timeout_s,
                  shutdown_timeout_seconds=shutdown_timeout_s)
    # CPU processes exchange data through gloo (the default has no cross-process collectives);
    # the option only concerns the CPU backend, so it is harmless on TPU and GPU.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    try:
        jax.distributed.initialize(**kwargs)
    except RuntimeError as e:
        if "must be called before" in str(e):
            raise UserError("jax.distributed must be initialized before JAX is first used; call "
                            "training.distributed.initialize() at the top of main()") from None
        raise
    _joined, _heartbeat_timeout_s = num_processes > 1, heartbeat_timeout_s
    return _joined


def joined() -> bool:
    """This process is one of several: `initialize` joined a runtime and JAX's client is up
    (an `initialize` whose runtime never started, as in a test, leaves nothing to leave)."""
    if not _joined:
        return False
    from jax._src import distributed as jax_distributed
    return jax_distributed.global_state.client is not None


def lost_processes(error: BaseException) -> list[int]:
    """The processes of the run lost before `error`, as JAX's coordination service sees them
    within its heartbeat timeout; [0] when the service itself (on process 0's host) is gone.
    Empty for an error of this process's own: only a failed collective means a lost peer."""
    import jax
    from jax._src import distributed as jax_distributed

    if not isinstance(error, jax.errors.JaxRuntimeError):
        return []  # our own failure: asking would wait for peers that wait for us
    count, me, found = jax.process_count(), jax.process_index(), {}

    def ask():  # a barrier of the live processes: it returns once the lost ones are known
        try:
            found["live"] = jax_distributed.global_state.client.get_live_nodes(list(range(count)))
        except Exception as e:  # noqa: BLE001  the coordinator is gone with its host
            found["error"] = e
    asking = threading.Thread(target=ask, daemon=True, name="lost-processes")
    asking.start()
    asking.join(_heartbeat_timeout_s + 15)
    if "live" not in found:
        return [0] if me != 0 and "error" in found else []
    return [i for i in range(count) if i not in found["live"] and i != me]


def leave(code: int):
    """End this process now with `code`, after flushing its output: JAX's shutdown at exit
    would wait for peers that may be gone, and their collectives for us."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe: nothing more to say
            pass
    os._exit(code)
