"""A real headless Debian `chromium`, driven through its DevTools protocol over a websocket.

Started on a free loopback port with its own profile in the test's temporary directory; every host
name but 127.0.0.1 resolves to nothing and Chromium's background services are off, so it never
reaches beyond loopback. It records every console error, uncaught exception and error log entry
of the page (`errors`). `close()` kills it (its process group, led by its pid).
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import shutil
import signal
import subprocess
from pathlib import Path
from typing import Any

import requests
from websockets.sync.client import ClientConnection, connect

from daqif.testing import wait_for

FLAGS = (
    "--headless=new",
    "--no-sandbox",  # the tests may run as root, where the sandbox refuses to start
    "--disable-gpu",
    "--no-first-run",
    "--no-default-browser-check",
    "--disable-extensions",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-default-apps",
    "--disable-domain-reliability",
    "--disable-client-side-phishing-detection",
    "--no-pings",
    "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
    "--remote-debugging-address=127.0.0.1",
    "--remote-debugging-port=0",
    "--window-size=1280,1100",
    "--hide-scrollbars",
)


class Chromium:
    def __init__(self, profile: Path) -> None:
        executable = shutil.which("chromium")
        if executable is None:
            raise AssertionError("chromium is not installed (tools/setup.sh --test installs it)")
        profile.mkdir(parents=True, exist_ok=True)
        self.process = subprocess.Popen(
            [executable, *FLAGS, f"--user-data-dir={profile}", "about:blank"],
            stdout=subprocess.DEVNULL,
            stderr=open(profile / "chromium.log", "wb"),  # noqa: SIM115 - the child holds it
            start_new_session=True,  # its own process group, killed by its pid in close()
        )
        self.errors: list[str] = []
        self._next_id = 0
        self._stack = contextlib.ExitStack()
        try:
            port_file = profile / "DevToolsActivePort"
            wait_for(lambda: port_file.exists() and port_file.read_text().count("\n") >= 1, 60, "chromium")
            port = int(port_file.read_text().splitlines()[0])
            targets = requests.get(f"http://127.0.0.1:{port}/json/list", timeout=10).json()
            page = next(t for t in targets if t["type"] == "page")
            self._ws: ClientConnection = self._stack.enter_context(
                connect(page["webSocketDebuggerUrl"], max_size=None)
            )
            for domain in ("Page", "Runtime", "Log"):
                self.send(f"{domain}.enable")
        except BaseException:
            self.close()
            raise

    def send(self, method: str, **params: Any) -> dict[str, Any]:
        """One DevTools command; its result (events arriving meanwhile are recorded)."""
        self._next_id += 1
        ident = self._next_id
        self._ws.send(json.dumps({"id": ident, "method": method, "params": params}))
        while True:
            message = json.loads(self._ws.recv(timeout=60))
            if message.get("id") == ident:
                if "error" in message:
                    raise AssertionError(f"{method}: {message['error']}")
                result: dict[str, Any] = message.get("result", {})
                return result
            self._record(message)

    def _record(self, event: dict[str, Any]) -> None:
        method, params = event.get("method"), event.get("params", {})
        if method == "Runtime.consoleAPICalled" and params.get("type") == "error":
            self.errors.append("console: " + " ".join(str(a.get("value", a)) for a in params.get("args", [])))
        elif method == "Runtime.exceptionThrown":
            self.errors.append("exception: " + json.dumps(params.get("exceptionDetails", {}))[:500])
        elif method == "Log.entryAdded" and params.get("entry", {}).get("level") == "error":
            entry = params["entry"]
            self.errors.append(f"log: {entry.get('text')} {entry.get('url', '')}")

    def navigate(self, url: str) -> None:
        self.send("Page.navigate", url=url)
        wait_for(lambda: self.evaluate("document.readyState") == "complete", 30, f"{url} loaded")

    def evaluate(self, expression: str) -> Any:
        reply = self.send("Runtime.evaluate", expression=expression, returnByValue=True)
        if "exceptionDetails" in reply:
            raise AssertionError(f"{expression}: {reply['exceptionDetails']}")
        return reply["result"].get("value")

    def wait_until(self, expression: str, what: str, timeout: float = 60.0) -> Any:
        """Wait until `expression` is truthy in the page (the page is pushed its updates; this only
        looks at the DOM)."""
        return wait_for(lambda: self.evaluate(expression), timeout, what)

    def screenshot(self, path: Path) -> Path:
        data = self.send("Page.captureScreenshot", format="png", captureBeyondViewport=True)["data"]
        path.write_bytes(base64.b64decode(data))
        return path

    def close(self) -> None:
        self._stack.close()
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(30)
