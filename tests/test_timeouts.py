"""CI's per-test time limit: set for the default and the slow run, and a hang ends with the stack
of every thread rather than holding CI until its budget runs out."""

import subprocess
import sys
from pathlib import Path

import pytest

from conftest import SLOW_TIMEOUT

ROOT = Path(__file__).resolve().parents[1]

HANGING = '''
import threading

def test_hangs():
    threading.Thread(target=threading.Event().wait, name="stuck-helper", daemon=True).start()
    threading.Event().wait()
'''


def test_every_test_has_a_limit(request):
    assert float(request.config.getini("timeout")) == 300
    assert request.config.getini("timeout_method") == "thread"


@pytest.mark.slow
def test_slow_tests_get_the_slow_limit(request):
    assert request.node.get_closest_marker("timeout").args == (SLOW_TIMEOUT,)


def test_a_hang_fails_with_every_thread_stack(tmp_path):
    (tmp_path / "test_hang.py").write_text(HANGING)
    # The project's settings, only the limit shortened so the test takes seconds.
    run = subprocess.run([sys.executable, "-m", "pytest", "-c", str(ROOT / "pyproject.toml"),
                          "--rootdir", str(tmp_path), "-p", "no:cacheprovider", "-o", "timeout=2",
                          str(tmp_path / "test_hang.py")],
                         capture_output=True, text=True, timeout=120)
    out = run.stdout + run.stderr
    assert run.returncode != 0
    assert "Timeout" in out, out[-2000:]
    assert "stuck-helper" in out and "test_hangs" in out, out[-3000:]
