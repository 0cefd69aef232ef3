"""`python -m servers.web.main` (what `daqif web` runs): a busy port is one line naming it."""

from __future__ import annotations

import socket
import subprocess
import sys


def test_a_busy_port_is_a_one_line_error_naming_it() -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = subprocess.run(
            [sys.executable, "-m", "servers.web.main", "--port", str(port)],
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert result.returncode == 2
    assert f"cannot bind the status page to 127.0.0.1:{port}" in result.stderr
    assert "Traceback" not in result.stderr
