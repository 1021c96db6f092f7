"""The command line as a shell uses it."""
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_output_into_a_closed_pipe_ends_quietly():
    """``tritonforge --help | head`` : a reader that goes away early is not an error worth a traceback."""
    read, write = os.pipe()
    os.close(read)
    proc = subprocess.run([sys.executable, "-m", "engine.cli", "--help"], stdout=write, stderr=subprocess.PIPE,
                          cwd=ROOT, text=True, timeout=120)
    os.close(write)
    assert proc.returncode == 141 and proc.stderr == ""
