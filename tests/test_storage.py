"""gs:// wherever a local path works, against a real GCS-compatible server on loopback (tests/gcs.py):
the CLIs end to end on a bucket, and bad storage as one line, fast, with nothing lost."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from etils import epath

from conftest import TINY_FT, mounted_tmpfs, sigterm_when, tiny_flags
from gcs import BUCKET, ReadOnlyEndpoint, object_names
from training import storage
from training.checkpoint import Checkpointer
from training.errors import UserError
from training.metrics import read_metrics

REPO = Path(__file__).resolve().parents[1]


def pretrain(workdir, data_dir, **extra) -> list[str]:
    return [sys.executable, "-m", "pretrain", "--workdir", str(workdir), *tiny_flags(data_dir, **extra)]


def run(command, env=None, timeout=600) -> subprocess.CompletedProcess:
    return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


def losses(workdir) -> dict[int, float]:
    return {m["step"]: m["train/loss"] for m in read_metrics(workdir) if "train/loss" in m}


def one_line(result: subprocess.CompletedProcess) -> str:
    """The one error line a CLI printed (exit status 2, no traceback)."""
    assert result.returncode == 2, (result.returncode, result.stderr[-2000:])
    lines = [l for l in result.stderr.splitlines() if l.startswith("error: ")]
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
    return lines[0]


# ---- the CLIs on a bucket --------------------------------------------------------------------

@pytest.mark.slow  # three CLI runs (about 60 s)
def test_a_bucket_run_prepares_trains_checkpoints_and_resumes_bitwise(gcs, tmp_path, data_dir):
    """Workdir and data dir on the bucket; SIGTERM, then the same command continues with losses
    bitwise equal to an uninterrupted local run."""
    steps = dict(train__steps=10, checkpoint__every_steps=3)
    full = run(pretrain(tmp_path / "full", data_dir, **steps))
    assert full.returncode == 0, full.stderr[-2000:]

    workdir, bucket_data = f"gs://{BUCKET}/resume/run", f"gs://{BUCKET}/resume/data"
    command = pretrain(workdir, bucket_data, **steps)
    _, out = sigterm_when(command, lambda: object_names(gcs, "resume/run/checkpoints/3/", limit=1))
    stopped_at = max(losses(workdir))
    assert 3 <= stopped_at < 10, "the run finished before it was stopped; nothing was tested"
    assert f"SIGTERM: stopped at step {stopped_at}" in out
    for name in ("config.json", "tokenizer/tokenizer.json", "tokenizer/vocab.txt", f"checkpoints/{stopped_at}"):
        assert (epath.Path(workdir) / name).exists(), name
    assert list((epath.Path(workdir) / "tensorboard").iterdir()), "no TensorBoard events"
    prepared = object_names(gcs, "resume/data/prepared/")
    assert any(name.endswith(".array_record") for name in prepared), "nothing prepared in the bucket"

    again = run(command)
    assert again.returncode == 0, again.stderr[-2000:]
    assert losses(workdir) == losses(tmp_path / "full")  # every step, bitwise
    assert not (epath.Path(workdir) / "lease.json").exists()


@pytest.mark.slow  # three CLI runs and transformers (about 90 s)
def test_finetune_and_export_read_and_write_buckets(gcs, tmp_path, data_dir):
    workdir = f"gs://{BUCKET}/export/run"
    done = run(pretrain(workdir, f"gs://{BUCKET}/export/data"))
    assert done.returncode == 0, done.stderr[-2000:]

    ft = run([sys.executable, "-m", "finetune", "--init", workdir, "--workdir", f"gs://{BUCKET}/export/ft",
              *[f"--config.{k}={v}" for k, v in TINY_FT.items()], f"--config.data.data_dir={data_dir}"])
    assert ft.returncode == 0, ft.stderr[-2000:]
    results = json.loads((epath.Path(gcs_path("export/ft")) / "results.json").read_text())
    assert results["test"]["accuracy"] >= 0 and results["best_step"] in (3, 6)

    out = f"gs://{BUCKET}/export/hf"
    export = run([sys.executable, "-m", "models.hf", "export", "--checkpoint", workdir, "--out", out])
    assert export.returncode == 0, export.stderr[-2000:]
    assert f"to {out}" in export.stdout

    local = tmp_path / "hf"  # copied down, as a user would
    storage.download(out, local)
    import torch
    from transformers import AutoModelForPreTraining, AutoTokenizer
    model = AutoModelForPreTraining.from_pretrained(local).eval()
    tokenizer = AutoTokenizer.from_pretrained(local)
    ids = tokenizer("The president said on Monday.", return_tensors="pt")
    with torch.no_grad():
        logits = model(**ids).prediction_logits
    assert logits.shape[-1] == model.config.vocab_size and torch.isfinite(logits).all()


def gcs_path(rel: str) -> str:
    return f"gs://{BUCKET}/{rel}"


# ---- bad storage: one line, fast, nothing lost -----------------------------------------------

def test_a_missing_bucket_is_one_line_within_seconds(gcs, data_dir):
    start = time.monotonic()
    result = run(pretrain("gs://no-such-bucket-here/run", data_dir))
    line = one_line(result)
    assert "bucket gs://no-such-bucket-here does not exist" in line and "--workdir" in line, line
    assert time.monotonic() - start < 60  # interpreter and JAX start included


def test_a_bucket_data_dir_that_does_not_exist_is_one_line(gcs, tmp_path):
    line = one_line(run(pretrain(tmp_path / "run", "gs://no-such-data-bucket/data")))
    assert "data.data_dir gs://no-such-data-bucket/data" in line and "does not exist" in line, line


def test_a_read_only_bucket_is_one_line_and_untouched(gcs, data_dir):
    marker = epath.Path(gcs_path("readonly/run/keep.txt"))
    marker.write_text("written before")
    with ReadOnlyEndpoint(gcs) as endpoint:
        env = {"STORAGE_EMULATOR_HOST": endpoint.url, "TENSORSTORE_GCS_HTTP_URL": endpoint.url}
        line = one_line(run(pretrain(gcs_path("readonly/run"), data_dir), env=env))
        assert "--workdir gs://pretrax-test/readonly/run cannot be written" in line, line
        assert "Forbidden" in line or "403" in line, line
        export = run([sys.executable, "-m", "models.hf", "export", "--checkpoint", "/nonexistent",
                      "--out", gcs_path("readonly/hf")], env=env)
        assert "--out gs://pretrax-test/readonly cannot be written" in one_line(export)
    assert [p.name for p in marker.parent.iterdir()] == ["keep.txt"]


def test_an_unreachable_endpoint_does_not_hang(gcs, data_dir):
    closed = "http://127.0.0.1:9"  # discard port: nothing listens
    env = {"STORAGE_EMULATOR_HOST": closed, "TENSORSTORE_GCS_HTTP_URL": closed,
           "PRETRAX_STORAGE_CHECK_SECONDS": "5"}
    start = time.monotonic()
    line = one_line(run(pretrain(gcs_path("unreachable/run"), data_dir), env=env, timeout=120))
    assert line.startswith("error: --workdir gs://pretrax-test/unreachable/run"), line
    assert time.monotonic() - start < 60


@pytest.fixture
def read_only_dir(tmp_path):
    """A folder this process cannot write: chmod for a normal user; for root (which chmod does
    not stop) a read-only tmpfs, where the machine lets the test mount one."""
    folder = tmp_path / "ro"
    folder.mkdir()
    if os.geteuid() != 0:
        folder.chmod(0o555)
        yield folder
        folder.chmod(0o755)
        return
    with mounted_tmpfs(folder, "ro,size=64k"):
        yield folder


def test_a_local_workdir_in_a_read_only_folder_is_one_line(read_only_dir, data_dir):
    line = one_line(run(pretrain(read_only_dir / "run", data_dir), timeout=120))
    assert f"--workdir {read_only_dir / 'run'} cannot be written" in line, line
    assert "Read-only file system" in line or "Permission denied" in line, line


def test_a_failed_save_to_a_bucket_keeps_the_last_checkpoint(gcs, monkeypatch):
    """The bucket refuses step 2's writes (a real server answering 403, as for lost write
    access): one line naming the step and the one to resume from, and step 1 still restores."""
    from test_checkpoint_faults import state, target
    from gcs import _forget_clients
    workdir = gcs_path("refusedsave/run")
    with ReadOnlyEndpoint(gcs, refused="refusedsave/run/checkpoints/2") as endpoint:
        for name in ("STORAGE_EMULATOR_HOST", "TENSORSTORE_GCS_HTTP_URL"):
            monkeypatch.setenv(name, endpoint.url)
        _forget_clients()
        ckpt = Checkpointer(workdir, every_steps=1, keep=1)  # keep=1: step 1 is due for deletion
        assert ckpt.maybe_save(1, state(1), {"iterator": {"position": 1}})
        ckpt.wait()
        with pytest.raises(UserError) as e:
            ckpt.maybe_save(2, state(2), {"iterator": {"position": 2}})
            ckpt.wait()
        message = str(e.value)
        assert "\n" not in message and ("403" in message or "Forbidden" in message
                                        or "PERMISSION_DENIED" in message), message
        assert f"checkpoint step 2 to {workdir}/checkpoints failed" in message and "resume from step 1" in message
        ckpt.close()
    monkeypatch.undo()
    _forget_clients()
    step, restored, data = Checkpointer(workdir, 1, 1).restore_latest(target())
    assert step == 1 and data == {"iterator": {"position": 1}}
    assert float(np.asarray(restored["params"]["encoder"]["layers"][0]["w"]).ravel()[0]) == 1.0


def test_paths_keep_their_bucket_and_local_paths_their_meaning(tmp_path):
    assert str(storage.as_path("gs://b/x/y")) == "gs://b/x/y"  # pathlib would give gs:/b/x/y
    assert str(storage.absolute("gs://b/x")) == "gs://b/x"
    assert storage.as_path("~/x") == epath.Path(os.path.expanduser("~/x"))
    assert storage.mirror_path("gs://b/x").parts[-2:] == ("b", "x")
    with pytest.raises(UserError, match="cannot be written .*Not a directory"):
        (tmp_path / "file").write_text("")
        storage.check_writable(tmp_path / "file" / "run", "--workdir")


def test_closed_bucket_metrics_upload_nothing_more(gcs, tmp_path, monkeypatch):
    """tensorboardX's gs:// event file uploads again whenever it is closed, and its `__del__`
    closes it: at exit, after a run whose bucket is gone, that upload retried for minutes."""
    import gc
    from google.cloud import storage as gcs_client
    from tensorboardX.record_writer import GCSRecordWriter
    from training.metrics import MetricsWriter
    workdir = gcs_path(f"metrics-{tmp_path.name}")
    writer = MetricsWriter(workdir)
    writer.write(1, {"train/loss": 2.5})
    writer.close()
    assert read_metrics(workdir) == [{"step": 1, "train/loss": 2.5}]
    (events,) = [o for o in gc.get_objects()
                 if isinstance(o, GCSRecordWriter) and o.path.startswith(workdir + "/")]
    assert events.buffer.getvalue(), "no TensorBoard events were written: nothing was tested"
    uploads = []
    monkeypatch.setattr(gcs_client.Blob, "upload_from_string", lambda self, **kw: uploads.append(self.name))
    events.__del__()  # what the garbage collector does at exit
    assert uploads == []
