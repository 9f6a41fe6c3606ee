"""`profile.steps=START:COUNT`: a trace of those steps under workdir/profile/ that the XProf tools
read (TensorBoard's profile plugin is XProf), and training unchanged bitwise by it."""

import gzip
import json

import pytest
from etils import epath

from conftest import TINY_FT, cli_error, tiny_flags
from gcs import BUCKET
from training.metrics import read_metrics

STEPS = 4


def pretrain(workdir, data_dir, **extra) -> None:
    from pretrain.__main__ import main
    main(["--workdir", str(workdir), *tiny_flags(data_dir, train__steps=STEPS,
                                                 checkpoint__every_steps=STEPS, **extra)])


def learned(workdir) -> list[dict]:
    """Every logged value but the timings."""
    return [{k: v for k, v in row.items() if not k.startswith("perf/")}
            for row in read_metrics(workdir)]


def trace_files(workdir, kind: str) -> list[epath.Path]:
    return sorted(epath.Path(workdir, "profile", "plugins", "profile", "steps_3_2").glob(f"*.{kind}"))


@pytest.mark.slow  # two tiny pretraining runs: about 2.5 minutes on the shared 2-core machine
def test_a_profiled_run_leaves_a_trace_the_xprof_tools_read_and_learns_the_same(tmp_path, data_dir):
    pretrain(tmp_path / "plain", data_dir)
    pretrain(tmp_path / "profiled", data_dir, profile__steps="3:2")
    assert not (tmp_path / "plain" / "profile").exists()
    assert learned(tmp_path / "profiled") == learned(tmp_path / "plain")  # bitwise: == on floats
    (xplane,) = trace_files(tmp_path / "profiled", "xplane.pb")
    # The Perfetto file: a Chrome trace with the two annotated train steps in it.
    (perfetto,) = trace_files(tmp_path / "profiled", "trace.json.gz")
    events = json.loads(gzip.decompress(perfetto.read_bytes()))["traceEvents"]
    steps = {e.get("args", {}).get("step_num") for e in events if e.get("name") == "train"}
    assert steps == {"3", "4"}, steps
    raw_to_tool_data = pytest.importorskip("xprof.convert.raw_to_tool_data")
    assert "trace_viewer@" in raw_to_tool_data.xspace_to_tool_names([str(xplane)])
    data, _ = raw_to_tool_data.xspace_to_tool_data([str(xplane)], "trace_viewer", {})
    names = {e.get("name", "") for e in json.loads(data)["traceEvents"]}
    assert any("train_step" in n for n in names), sorted(names)[:50]


def test_the_profiler_traces_its_steps_only_and_returns_their_values(tmp_path):
    """The loop's part alone, on a small jitted step (the runs above are in the slow suite)."""
    import jax
    import jax.numpy as jnp
    import ml_collections
    from training.profiling import Profiler

    config = ml_collections.ConfigDict({"profile": {"steps": "3:2", "all_processes": False}})
    step_fn = jax.jit(lambda x: jnp.tanh(x @ x.T) * 0.5 + x)
    x = plain = jnp.linspace(-1, 1, 64 * 64).reshape(64, 64)
    profiler = Profiler(config, tmp_path)
    for step in range(1, 6):
        x = profiler.run_step(step, lambda: step_fn(x))
        plain = step_fn(plain)
        profile = tmp_path / "profile" / "plugins" / "profile" / "steps_3_2"
        assert profile.exists() == (step >= 4), step  # written once step 4 is done
    profiler.close()
    assert bool((x == plain).all())
    (perfetto,) = profile.glob("*.trace.json.gz")
    events = json.loads(gzip.decompress(perfetto.read_bytes()))["traceEvents"]
    assert {e["args"]["step_num"] for e in events if e.get("name") == "train"} == {"3", "4"}
    assert len(list(profile.glob("*.xplane.pb"))) == 1


@pytest.mark.slow  # a pretraining run and a fine-tuning run: about 2 minutes
def test_bucket_workdirs_and_fine_tuning_are_profiled(gcs, tmp_path, data_dir):
    workdir = f"gs://{BUCKET}/profile-{tmp_path.name}"
    pretrain(workdir, data_dir, profile__steps="3:2")
    assert trace_files(workdir, "xplane.pb") and trace_files(workdir, "trace.json.gz")
    from finetune.__main__ import main
    flags = [f"--config.{k}={v}" for k, v in {**TINY_FT, "profile.steps": "3:2"}.items()]
    main(["--config", "configs/finetune_rt_polarity.py", "--init", "none", "--workdir",
          str(tmp_path / "ft"), f"--config.data.data_dir={data_dir}", *flags])
    assert trace_files(tmp_path / "ft", "xplane.pb")


@pytest.mark.parametrize("value", ["3", "0:2", "3:0", "a:b", "3:2:1"])
def test_a_bad_profile_span_is_one_line(capsys, tmp_path, data_dir, value):
    from pretrain.__main__ import main
    err = cli_error(capsys, main, ["--workdir", str(tmp_path / "run"),
                                   *tiny_flags(data_dir, profile__steps=value)])
    assert "profile.steps" in err and "START:COUNT" in err, err
