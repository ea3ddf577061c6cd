"""The `offload` command run as a user runs it: a subprocess (python -m offload, or the installed script)."""
from __future__ import annotations

import os
import subprocess
import sys

from tests.examples.builders import REPO


def run_offload(*args, stdin: str = "", env: dict | None = None, timeout: float = 300,
                script: bool = False) -> subprocess.CompletedProcess:
    """`offload ARGS` with `stdin` piped in; `env` entries added to this environment; `script`: through the
    console script pip installed beside this Python (as a user types it), else `python -m offload`."""
    command = [os.path.join(os.path.dirname(sys.executable), "offload")] if script else [sys.executable, "-m",
                                                                                          "offload"]
    return subprocess.run([*command, *map(str, args)], input=stdin, capture_output=True, text=True,
                          timeout=timeout, cwd=REPO, env={**os.environ, **(env or {})})


def one_error_line(out: subprocess.CompletedProcess, prog: str) -> str:
    """The one `PROG: error: ...` line of a run that failed as a user mistake must (exit 2, no traceback)."""
    assert out.returncode == 2, (out.returncode, out.stderr[-2000:])
    assert "Traceback" not in out.stderr and out.stdout == "", out.stderr[-2000:]
    errors = [line for line in out.stderr.splitlines() if line.startswith(f"{prog}: error: ")]
    assert len(errors) == 1, out.stderr
    return errors[0]
