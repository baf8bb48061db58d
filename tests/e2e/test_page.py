"""The read-only page at `/`, rendered by headless Chromium (Debian's `chromium`) against a live server.

Chromium is optional (`make test` names it when missing): the test is skipped without it.
GROVE_UPDATE_SCREENSHOT=1 also saves the screenshot as docs/page.png.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import httpx
import pytest

from tests.conftest import REPO
from tests.e2e.helpers import sdk, upload_emotion, wait_for

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install chromium)")


def chromium(*args: str, tmp: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [
            CHROMIUM,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--no-first-run",
            f"--user-data-dir={tmp / 'chromium-profile'}",
            "--window-size=1400,820",
            "--virtual-time-budget=15000",
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_page_renders_the_job_row_and_the_loss_chart(live, tmp_path):
    page = httpx.get(f"{live.base_url}/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")

    key = live.new_key()
    client = sdk(live.base_url, key)
    training = upload_emotion(client, tmp_path, 40)
    validation = upload_emotion(client, tmp_path, 12, offset=1000, name="valid.jsonl")
    job = client.fine_tuning.jobs.create(
        model="tiny-llama-test",
        training_file=training,
        validation_file=validation,
        extra_body={
            "text_template": "{text} -> {label}",
            "max_steps": 16,
            "log_every_steps": 1,
            "eval_every_steps": 4,
            "learning_rate": 5e-3,
        },
    )
    assert wait_for(client, job.id).status == "succeeded", live.log("worker.log")

    url = f"{live.base_url}/?job={job.id}#key={key}"
    dom = chromium("--dump-dom", url, tmp=tmp_path)
    assert dom.returncode == 0, dom.stderr[-2000:]
    html = dom.stdout
    row = re.search(rf'<tr data-job-id="{job.id}"[^>]*>(.*?)</tr>', html, re.S)
    assert row, html[-3000:]
    assert 'class="status succeeded"' in row.group(1) and "16/16" in row.group(1)
    points = re.search(r'<svg id="loss-chart"[^>]*data-points="(\d+)"', html)
    assert points and int(points.group(1)) >= 16, html[html.find("loss-chart") - 200 :][:600]
    train = re.search(r'<polyline class="train"[^>]*points="([^"]+)"', html)
    valid = re.search(r'<polyline class="valid"[^>]*points="([^"]+)"', html)
    assert train and len(train.group(1).split()) == 16
    assert valid and len(valid.group(1).split()) >= 4
    assert "The job has successfully completed." in html
    # The key came in the fragment, which the page removes from the address.
    assert key not in html

    shot = tmp_path / "page.png"
    taken = chromium(f"--screenshot={shot}", url, tmp=tmp_path)
    assert taken.returncode == 0 and shot.stat().st_size > 10_000, taken.stderr[-2000:]
    if os.environ.get("GROVE_UPDATE_SCREENSHOT") == "1":
        shutil.copy(shot, REPO / "docs" / "page.png")


def test_page_shows_an_error_for_a_wrong_key(live, tmp_path):
    dom = chromium("--dump-dom", f"{live.base_url}/#key=grove-not-a-key", tmp=tmp_path)
    assert dom.returncode == 0
    assert "Incorrect API key provided." in dom.stdout
