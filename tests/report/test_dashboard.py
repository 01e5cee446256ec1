"""The dashboard during a real run: served over HTTP by ``fedforge run --dashboard``, polled
while the run trains, and its page's script run against it (in Node, and in a headless
Chromium where one is installed)."""

from __future__ import annotations

import json
import queue
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from fedforge.core.errors import FedforgeError
from fedforge.report.dashboard import Dashboard, page, read_token
from fedforge.report.history import History
from fedforge.report.live import LiveState
from tests.test_cli import SMALL, fedforge

HARNESS = Path(__file__).with_name("dashboard_harness.js")
NODE = shutil.which("node")
CHROMIUM = next(
    (shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)),
    None,
)
ROUNDS = 40  # enough rounds to be caught mid-run by 20 ms polls on a fast machine


def get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=10) as response:
        return response.read()  # type: ignore[no-any-return]


def api(url: str) -> dict[str, Any]:
    return json.loads(get(url + "api/state"))  # type: ignore[no-any-return]


def node_view(url: str, tmp: Path) -> dict[str, Any]:
    """What the page's script shows after one poll of ``url`` (run in Node)."""
    assert NODE is not None
    html = tmp / "dashboard.html"
    html.write_bytes(page())
    proc = subprocess.run(
        [NODE, str(HARNESS), str(html), url], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)  # type: ignore[no-any-return]


def chromium_round(url: str) -> str:
    """The round the page shows in a headless Chromium, read from its rendered DOM."""
    assert CHROMIUM is not None
    with tempfile.TemporaryDirectory() as profile:
        proc = subprocess.run(
            [
                CHROMIUM,
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                f"--user-data-dir={profile}",
                "--virtual-time-budget=3000",
                "--dump-dom",
                url,
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )
    found = re.search(r'id="round">([^<]*)<', proc.stdout)
    assert found is not None, proc.stdout[-2000:] + proc.stderr[-2000:]
    return found.group(1)


def start_run(tmp_path: Path) -> tuple[subprocess.Popen[str], str, Path]:
    cfg = tmp_path / "small.toml"
    cfg.write_text(SMALL)
    out = tmp_path / "run"
    proc = subprocess.Popen(
        [
            *(sys.executable, "-m", "fedforge.cli", "run", str(cfg), "--out", str(out)),
            *("--set", f"server.rounds={ROUNDS}", "--set", "runtime.backend=sequential"),
            *("--dashboard", "--dashboard-port", "0", "--quiet"),
        ],
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
    )
    lines: queue.Queue[str] = queue.Queue()
    assert proc.stderr is not None
    stream = proc.stderr
    threading.Thread(target=lambda: [lines.put(x) for x in stream], daemon=True).start()
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            line = lines.get(timeout=1)
        except queue.Empty:
            assert proc.poll() is None, "the run ended before serving a dashboard"
            continue
        found = re.search(r"dashboard: (http://127\.0\.0\.1:\d+/)", line)
        if found:
            return proc, found.group(1), out
    raise AssertionError("no dashboard URL printed")


def test_the_dashboard_follows_a_real_run_and_its_page_shows_it(tmp_path: Path) -> None:
    proc, url, out = start_run(tmp_path)
    html = get(url).decode()
    assert "<script>" in html and "api/state" in html
    # Everything ships in the page: no external script, style sheet, font or image.
    assert not re.search(r"""(src|href)\s*=|<link|@import|url\(""", html)
    with pytest.raises(urllib.error.HTTPError):
        get(url + "nothing-here")
    seen: list[int] = []
    views: list[tuple[int, dict[str, Any], int]] = []
    while proc.poll() is None:
        try:
            state = api(url)
        except (urllib.error.URLError, ConnectionError):
            break  # the run ended and its server with it
        count = len(state["rounds"])
        if not seen or count != seen[-1]:
            seen.append(count)
        if NODE and not views and 2 <= count < ROUNDS - 5:
            view = node_view(url, tmp_path)
            after = len(api(url)["rounds"])
            views.append((count, view, after))
        time.sleep(0.02)
    assert proc.wait(timeout=120) == 0
    # Polled while training: the numbers moved several times before the end.
    assert len(seen) >= 3 and seen == sorted(seen), seen
    assert seen[0] < ROUNDS + 1
    if NODE:
        assert views, f"the run finished before the page could be loaded mid-run: {seen}"
        before, view, after = views[0]
        shown = int(view["round"].split(" / ")[0])
        assert view["round"].endswith(f" / {ROUNDS}") and view["status"] == "running"
        assert before - 1 <= shown <= after - 1  # round 0 is the initial evaluation
        assert view["acc_points"] == [view["state_rounds"]]  # one point per recorded round
        assert view["accuracy"].endswith("%") and view["loss"] != "-"
        assert view["epsilon_hidden"] is True

    # Once finished, `fedforge dashboard RUN_DIR` serves the whole run from disk.
    history = History.load(out / "history.json")
    with Dashboard(out, port=0) as server:
        state = api(server.url)
        assert state["status"] == "finished"
        assert [r["test_accuracy"] for r in state["rounds"]] == [r.test_accuracy for r in history]
        assert state["provenance"]["backend"] == "sequential"
        assert "on digits, dirichlet over 12 clients, 4 per round" in state["title"]
        assert len(state["client_metrics"]["clients"]) == 4
        if NODE:
            view = node_view(server.url, tmp_path)
            assert view["status"] == "finished" and view["round"] == f"{ROUNDS} / {ROUNDS}"
            assert view["accuracy"] == f"{100 * history[-1].test_accuracy:.2f}%"
            assert view["acc_points"] == [ROUNDS + 1] and view["time_points"] == [ROUNDS + 1]
            assert view["bytes_points"] == [ROUNDS + 1]
            assert view["loss_points"] == [ROUNDS + 1, ROUNDS]  # test; train from round 1
            assert view["client_bars"] >= ROUNDS and view["client_rows"] == 4
            assert view["clients"] == "4/4 accepted"
            assert "backend sequential" in view["meta"] and view["data_rounds"] == str(ROUNDS)


@pytest.mark.skipif(CHROMIUM is None, reason="no Chromium installed (apt-get install chromium)")
def test_the_dashboard_page_updates_in_a_headless_browser(tmp_path: Path) -> None:
    proc, url, _ = start_run(tmp_path)
    shown: list[str] = []
    try:
        while proc.poll() is None and len(shown) < 2:
            try:
                count = len(api(url)["rounds"])
            except (urllib.error.URLError, ConnectionError):
                break
            if count >= 2 and (not shown or count - 1 > int(shown[-1].split(" / ")[0])):
                shown.append(chromium_round(url))
            time.sleep(0.05)
    finally:
        proc.wait(timeout=240)
    assert len(shown) == 2, shown
    assert int(shown[0].split(" / ")[0]) < int(shown[1].split(" / ")[0])


def test_dashboard_command_refuses_a_folder_that_is_not_a_run(tmp_path: Path) -> None:
    proc = fedforge("dashboard", str(tmp_path), "--port", "0")
    assert proc.returncode == 2 and "not a run directory" in proc.stderr


def test_beyond_loopback_the_dashboard_requires_a_token_never_from_argv(tmp_path: Path) -> None:
    (tmp_path / "config.toml").write_text("")
    # All interfaces and no token: refused in one line (it served the run to anyone).
    proc = fedforge("dashboard", str(tmp_path), "--host", "0.0.0.0", "--port", "0")
    assert proc.returncode == 2, proc.stderr
    assert "refusing to serve the dashboard on 0.0.0.0 without a token" in proc.stderr
    short = tmp_path / "short.token"
    short.write_text("abc\n")
    with pytest.raises(FedforgeError, match="fewer than 16"):
        read_token(short)
    token = "s3cret-token-0123456789"
    with Dashboard(tmp_path, host="0.0.0.0", port=0, token=token) as board:
        url = f"http://127.0.0.1:{board.url.rsplit(':', 1)[1]}"
        for path in ("/", "/api/state", "/?token=wrong-token-0123456789"):
            with pytest.raises(urllib.error.HTTPError) as refused:
                get(url + path)
            assert refused.value.code == 401
        request = urllib.request.Request(
            url + "/api/state", headers={"Authorization": f"Bearer {token}"}
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            assert json.loads(response.read())["status"] == "waiting"
        # The page opened once with ?token= sets a cookie its polls then carry.
        with urllib.request.urlopen(f"{url}/?token={token}", timeout=10) as response:
            cookie = response.headers["Set-Cookie"].split(";", 1)[0]
            assert "HttpOnly" in response.headers["Set-Cookie"]
        request = urllib.request.Request(url + "/api/state", headers={"Cookie": cookie})
        with urllib.request.urlopen(request, timeout=10) as response:
            assert response.status == 200


def test_live_state_of_an_empty_folder_is_waiting(tmp_path: Path) -> None:
    assert LiveState(tmp_path).state()["status"] == "waiting"


@pytest.mark.skipif(NODE is None, reason="no Node.js to run the page's script")
def test_the_page_shows_epsilon_problems_and_client_metrics(tmp_path: Path) -> None:
    from fedforge.report.history import RoundRecord
    from fedforge.report.live import LIVE, LiveLog
    from fedforge.runtime.driver import ACCEPTED, FAILED, REJECTED

    (tmp_path / "config.toml").write_text('[privacy]\nmode = "central"\nnoise_multiplier = 1.0\n')
    log = LiveLog(tmp_path / LIVE, every=0.0)
    log.round_finished(RoundRecord(0, 0.1, 2.3))
    dp = {"dp.epsilon": 0.75, "dp.delta": 1e-5, "clip.clipped": 2.0}
    log.round_started(1, [1, 2, 3])
    log.client_done(1, ACCEPTED)
    log.client_reported(1, ACCEPTED, "", {"train_loss": 0.5})
    log.client_done(2, REJECTED)
    log.client_reported(2, REJECTED, "0.weight: NaN or infinite <script>", {})
    log.client_done(3, FAILED)
    log.client_reported(3, FAILED, "RuntimeError: out of memory", {})
    record = RoundRecord(1, 0.4, 1.5, 1.4, 3, 1, 1, 1, 100, 50, metrics=dp)
    log.round_finished(record)
    log.round_started(2, [4, 5])
    log.client_done(4, ACCEPTED)
    with Dashboard(tmp_path, port=0) as server:
        view = node_view(server.url, tmp_path)
    assert view["epsilon_hidden"] is False and view["epsilon"] == "ε 0.750 (δ 0.00001)"
    assert view["problems"] == 2 and view["client_rows"] == 1
    assert view["clients"] == "1/2 done"  # the round in progress
    assert view["round"] == "1 / 50" and view["status"] == "running"
    assert "central DP" in view["title"]
