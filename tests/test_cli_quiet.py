"""The command line is quiet (issue 15, item 7): TensorFlow's native start-up logs (absl's
"before InitializeLog" notice, oneDNN, CPU features, CUDA probing) stay off stderr unless
--verbose. Run as a user runs it: the installed `graphfreeze` script in a subprocess, with
no TF_CPP_MIN_LOG_LEVEL set (it does not hold these lines back anyway)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys

import pytest

# absl/glog line prefix (I0000 00:00:..., W1114 ...), and the notices TensorFlow prints.
NATIVE = re.compile(r"^[IWEF]\d{4} |absl::InitializeLog|oneDNN|cuda|cpu_feature_guard", re.M | re.I)


def _graphfreeze(*args):
    script = shutil.which("graphfreeze", path=os.path.dirname(sys.executable))
    command = [script] if script else [sys.executable, "-m", "graphfreeze"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("TF_CPP_")}
    return subprocess.run(command + list(args), capture_output=True, text=True, env=env, timeout=600)


def test_native_logs_only_with_verbose_and_errors_still_show():
    verbose = _graphfreeze("demo", "--list", "--verbose")
    assert verbose.returncode == 0, verbose.stderr[-2000:]
    assert "seed000_grow_layer" in verbose.stdout.split()
    if not NATIVE.search(verbose.stderr):
        pytest.skip("this TensorFlow build prints no native start-up logs: nothing to silence")
    quiet = _graphfreeze("demo", "no_such_scenario")
    assert quiet.returncode == 2
    lines = quiet.stderr.splitlines()  # exactly graphfreeze's own one-line error
    assert len(lines) == 1 and lines[0].startswith(
        "graphfreeze: error: unknown scenario 'no_such_scenario'"), quiet.stderr[-2000:]


def test_a_scenario_runs_quietly():
    done = _graphfreeze("demo", "seed000_grow_layer")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "OK" in done.stdout and not NATIVE.search(done.stderr), done.stderr[-2000:]
