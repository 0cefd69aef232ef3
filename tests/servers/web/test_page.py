"""The status page in a real headless chromium, on a real system (simulator, writer, DPM, page).

It loads with no console error, shows a DAQ the test queues (with its ERROR alert while its
source is missing), sees it reach COMPLETED without a reload, and keeps working when the DPM and
the writer are killed and restarted: it says what it waits for meanwhile, and shows DAQs again.

Set `DAQIF_WEB_SCREENSHOT=PATH` to also copy the screenshot there (how `docs/web.png` is made).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests

from daqif.dpm_client import DpmClient
from daqif.testing import TEST_DETECTOR
from servers import system
from servers.supervisor import Supervisor
from servers.system import SystemConfig

from .browser import Chromium


@dataclass
class Running:
    config: SystemConfig
    supervisor: Supervisor
    dpm: DpmClient


@pytest.fixture
def running(tmp_path: Path) -> Iterator[Running]:
    config = SystemConfig(
        data_root=tmp_path / "data",
        dpm_port=0,
        rest_port=0,
        writer_grpc_port=0,
        stream_port=0,
        dpm_metrics_port=0,
        web_port=0,
        simulate=True,
        sim_rate=200.0,
        detector_overrides={**TEST_DETECTOR, "image_pixel_height": 256, "image_pixel_width": 256},
    )
    config.prepare()
    supervisor = Supervisor(log_dir=config.log_dir, max_restarts=0)
    try:
        bound = system.start(config, supervisor)
        with DpmClient(bound.dpm_address) as dpm:
            yield Running(bound, supervisor, dpm)
    finally:
        supervisor.stop()


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[Chromium]:
    chromium = Chromium(tmp_path / "chromium")
    try:
        yield chromium
    finally:
        chromium.close()


def row(daq_id: str, table: str) -> str:
    return f"document.querySelector('#{table} [data-daq-id=\"{daq_id}\"]')"


def banners(browser: Chromium) -> Any:
    return browser.evaluate("[...document.querySelectorAll('[data-waiting]')].map(b => b.textContent)")


def waiting_for(what: str) -> str:
    """Whether a banner of the page says it is waiting for `what`."""
    banner = "[...document.querySelectorAll('[data-waiting]')]"
    return f"{banner}.some(b => b.textContent.includes('waiting for {what}'))"


def spec(daq_id: str, source: Path, config: SystemConfig) -> dict[str, Any]:
    return {
        "id": daq_id,
        "target": {"fileId": daq_id},
        "sources": [{"type": "hdf5File", "sourceName": "det1", "location": str(source)}],
        "receivers": [{"type": "olasReceiver", "path": str(config.receiver_dir)}],
    }


def test_the_page_follows_a_daq_to_completed_and_survives_server_restarts(
    running: Running, browser: Chromium, tmp_path: Path
) -> None:
    config, dpm = running.config, running.dpm
    assert config.web_url is not None
    browser.navigate(config.web_url)
    browser.wait_until("document.querySelector('#writer-card').dataset.state === 'READY'", "writer READY")
    browser.wait_until("document.querySelectorAll('[data-waiting]').length === 0", "both servers reached")
    browser.wait_until("document.querySelector('#storage-gauge').dataset.used !== undefined", "storage gauge")

    # A DAQ whose source is not written yet: active, in COLLECTING with an ERROR alert.
    source = config.raw_dir / "web-1.h5"
    dpm.queue_daq(spec("WEB.1", source, config))
    browser.wait_until(f"{row('WEB.1', 'active')}?.dataset.substate === 'COLLECTING'", "WEB.1 active")
    browser.wait_until(f"{row('WEB.1', 'active')}.textContent.includes('ERROR collecting:det1')", "its alert")

    # The writer records the source (the page follows the acquisition), the operator retries.
    reply = requests.post(
        f"{config.rest_url}/writer/write_sync", json={"output_file": str(source), "n_images": 40}, timeout=60
    ).json()
    assert reply["status"] == "ok", reply
    browser.wait_until("document.querySelector('#acq-count').textContent === '40 of 40'", "write shown")
    dpm.retry_merge_daq("WEB.1")
    browser.wait_until(f"{row('WEB.1', 'finished')}?.dataset.substate === 'COMPLETED'", "WEB.1 COMPLETED")
    assert (config.receiver_dir / "WEB.1.h5").is_file()
    assert browser.evaluate(f"{row('WEB.1', 'active')} === null")
    shown = browser.evaluate(f"{row('WEB.1', 'finished')}.textContent")
    assert shown.count("COMPLETED") == 1
    product = dpm.get_daq_status("WEB.1", include_archived=True).result
    assert product.endswith("/WEB.1.h5") and product in shown, shown
    browser.wait_until("document.querySelectorAll('#rate-plot path').length === 2", "the throughput plot")
    # One more DAQ, waiting for its source: the active list shows it with its alert.
    dpm.queue_daq(spec("WEB.WAITING", config.raw_dir / "not-yet.h5", config))
    browser.wait_until(f"{row('WEB.WAITING', 'active')}?.textContent.includes('ERROR')", "WEB.WAITING alert")
    shot = browser.screenshot(tmp_path / "page.png")
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 10_000
    if os.environ.get("DAQIF_WEB_SCREENSHOT"):
        shutil.copyfile(shot, os.environ["DAQIF_WEB_SCREENSHOT"])

    # The DPM dies: the page says it waits for it, then shows new DAQs once it is back.
    running.supervisor.process("dpm").kill()
    browser.wait_until(waiting_for("the DPM"), "the page saying it waits for the DPM")
    running.supervisor.process("dpm").restart()
    browser.wait_until("document.querySelectorAll('[data-waiting]').length === 0", "the DPM reached again")
    with DpmClient(config.dpm_address) as again:
        again.queue_daq(spec("WEB.2", source, config))
    browser.wait_until(f"{row('WEB.2', 'finished')}?.dataset.substate === 'COMPLETED'", "WEB.2 COMPLETED")
    assert browser.evaluate(f"{row('WEB.1', 'finished')} !== null"), "the finished list is kept"

    # The writer dies: the same, and its state is shown again once it is back.
    running.supervisor.process("writer").kill()
    browser.wait_until(waiting_for("the writer"), "the page saying it waits for the writer")
    running.supervisor.process("writer").restart()
    browser.wait_until("document.querySelectorAll('[data-waiting]').length === 0", "the writer reached again")
    browser.wait_until(
        "document.querySelector('#writer-card').dataset.state === 'READY'", "writer READY again"
    )
    assert banners(browser) == []
    assert browser.errors == [], browser.errors


def test_the_page_shows_the_writers_live_preview(tmp_path: Path, browser: Chromium) -> None:
    from servers.common.commands import WebOptions
    from servers.common.launch import (
        ServerProcess,
        SimOptions,
        SimProcess,
        WriterOptions,
        WriterProcess,
        free_port,
    )

    live = f"tcp://127.0.0.1:{free_port()}"
    data_root = tmp_path / "data"
    data_root.mkdir()
    detector = tmp_path / "detector.json"
    detector.write_text('{"image_pixel_height": 48, "image_pixel_width": 32, "bit_depth": 16}')
    with SimProcess(
        SimOptions(shape=(48, 32), dtype="uint16", rate=100, header="stddaq", linger=0)
    ).start() as sim:
        writer = WriterProcess(
            WriterOptions(
                stream=sim.endpoint, data_root=data_root, config=detector, extra_args=("--live-stream", live)
            )
        ).start()
        page = ServerProcess(
            WebOptions(dpm="127.0.0.1:9", writer=writer.grpc_address, writer_preview=writer.rest_url)
        ).start()
        try:
            browser.navigate(page.ready.address("http"))
            browser.wait_until("!document.querySelector('#preview').hidden", "the preview shown")
            size = browser.evaluate(
                "(i => [i.naturalWidth, i.naturalHeight])(document.querySelector('#preview'))"
            )
            assert size == [32, 48]
            assert browser.evaluate("document.querySelector('#preview-none').hidden")
        finally:
            page.stop()
            writer.stop()
