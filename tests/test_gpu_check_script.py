"""scripts/gpu_check.sh's own behaviour, where it needs neither a GPU nor a build: the
one-line refusal without a GPU and the total budget that keeps the check within the
minutes a GPU machine is lent for. (The dry run's build and tests run in CI: .ci/run.)"""

import contextlib
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "gpu_check.sh"


def run_check(tmp_path, **env):
    environ = {k: v for k, v in os.environ.items() if not k.startswith("GPU_CHECK_")}
    environ.update(PYTHON=sys.executable, OUT=str(tmp_path / "logs"), **env)
    # A session of its own: past the timeout the whole script goes, with the steps it
    # started (each step's `timeout` makes a process group of its own, not a session).
    check = subprocess.Popen(["bash", str(SCRIPT)], env=environ, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        stdout, stderr = check.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        kill_session(check.pid)
        check.communicate()
        raise
    return subprocess.CompletedProcess(check.args, check.returncode, stdout, stderr)


def kill_session(session: int) -> None:
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError):
                if os.getsid(int(entry)) == session:
                    os.kill(int(entry), signal.SIGKILL)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
def test_without_a_gpu_it_refuses_in_one_line(tmp_path):
    result = run_check(tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0
    assert "no CUDA GPU" in result.stderr
    assert not (tmp_path / "logs" / "build.log").exists()


def test_a_step_that_cannot_get_its_minimum_is_not_started_and_fails_the_check(tmp_path):
    # A budget below the minimum a step needs: not even the environment step starts, so
    # nothing is built, and the check fails as incomplete rather than passing.
    result = run_check(tmp_path, GPU_CHECK_DRY="1", GPU_CHECK_BUDGET="5", GPU_CHECK_MIN_STEP_S="30")
    assert result.returncode == 1
    assert "environment: not started" in result.stdout
    assert "build: not started" in result.stdout
    assert "gpu-check failed: environment: not started (budget spent)" in result.stderr
    assert not (tmp_path / "logs" / "build.log").exists()


def test_a_step_gets_what_is_left_of_the_budget_as_its_deadline(tmp_path):
    # 31 s: the environment step (deadline 120 s) runs under a cut deadline; the build,
    # which would need 30 s of what is left, is not started.
    result = run_check(tmp_path, GPU_CHECK_DRY="1", GPU_CHECK_BUDGET="31", GPU_CHECK_MIN_STEP_S="30")
    # 31 s, or 30 when a second of the clock ticked before the first step.
    assert re.search(r"== environment \(deadline 3[01]s\) ==", result.stdout), result.stdout
    assert "-- environment: ok" in result.stdout
    assert "build: not started" in result.stdout
    assert result.returncode == 1
    assert not (tmp_path / "logs" / "build.log").exists()


@pytest.mark.parametrize("name", ["GPU_CHECK_BUDGET", "GPU_CHECK_MIN_STEP_S"])
@pytest.mark.parametrize("value", ["8m", "-5", "1.5"])
def test_a_budget_that_is_not_whole_seconds_is_refused_by_name(tmp_path, name, value):
    result = run_check(tmp_path, GPU_CHECK_DRY="1", **{name: value})
    assert result.returncode == 2
    assert f"gpu-check: {name} must be whole seconds, got '{value}'" in result.stderr
    assert not (tmp_path / "logs" / "environment.log").exists()


def test_a_budget_with_a_leading_zero_is_read_in_base_10(tmp_path):
    # 031 would be octal 25 to bash arithmetic, and 08 an error that skipped every step.
    result = run_check(tmp_path, GPU_CHECK_DRY="1", GPU_CHECK_BUDGET="031", GPU_CHECK_MIN_STEP_S="030")
    assert re.search(r"== environment \(deadline 3[01]s\) ==", result.stdout), result.stdout
    assert "build: not started" in result.stdout
    assert result.returncode == 1


def test_a_step_never_runs_without_a_deadline(tmp_path):
    # With no minimum, a spent budget would leave a deadline of 0, which timeout reads as none.
    result = run_check(tmp_path, GPU_CHECK_DRY="1", GPU_CHECK_BUDGET="1", GPU_CHECK_MIN_STEP_S="0")
    assert "(deadline 0s)" not in result.stdout
    assert result.returncode == 1
