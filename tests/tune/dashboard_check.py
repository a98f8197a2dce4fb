"""Open the Ray dashboard of a real run in a real browser, log in with the token, and check
that the trials are there: their actors, and each one's node and resources.

    PYTHONPATH=. .venv/bin/python -m tests.tune.dashboard_check [--screenshot docs/dashboard_actors.png]

It starts the command (one small test_mit trial, a few epochs, dashboard on), reads the
dashboard URL from its log, and drives headless Chromium through the DevTools protocol over a
pipe (`--remote-debugging-pipe`: no extra package, no port). With a fresh browser profile the
Actors page must show Ray's "Authentication Token Required" dialog and no trial; after the
token is typed into that dialog and submitted, as a user would, the Actors page must list the
trial's actor with its node and its resources. The token comes from `ray get-auth-token`, as
the command's log and README tell the user; it is never printed or written anywhere.
tests/tune/test_dashboard.py runs this check.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
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

from tests.tune.helpers import poll_until, start

ROOT = Path(__file__).resolve().parents[2]
BROWSERS = ("chromium-headless-shell", "chromium", "chromium-browser")
LOGIN_TITLE = "Authentication Token Required"
TOKEN_FIELD = 'input[placeholder="Enter your authentication token"]'
DASHBOARD_LINE = re.compile(r"Ray dashboard: (http://\S+)")
WINDOW = (1600, 1000)
SHOT = (3100, 520)  # the Actors table's full width, its first rows


class DashboardCheckError(AssertionError):
    pass


# -- the browser ---------------------------------------------------------------------------
class Browser:
    """Headless Chromium driven through the DevTools protocol on fds 3 (commands in) and 4
    (replies out), each message JSON ended by a NUL byte."""

    def __init__(self, binary: str, profile: Path):
        commands_r, self._commands_w = os.pipe()
        self._replies_r, replies_w = os.pipe()

        def give_pipes() -> None:  # in the child, before exec
            a, b = os.dup(commands_r), os.dup(replies_w)
            os.dup2(a, 3, inheritable=True)
            os.dup2(b, 4, inheritable=True)

        self.process = subprocess.Popen(
            [binary, "--headless", "--no-sandbox", "--disable-gpu", "--remote-debugging-pipe",
             f"--user-data-dir={profile}", f"--window-size={WINDOW[0]},{WINDOW[1]}",
             "--no-first-run", "about:blank"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            close_fds=False, preexec_fn=give_pipes)
        os.close(commands_r)
        os.close(replies_w)
        self._next_id = 0
        self._replies: dict[int, queue.Queue] = {}
        self._lock = threading.Lock()
        threading.Thread(target=self._read, daemon=True).start()
        self.session = self._attach()

    def _read(self) -> None:
        buffer = b""
        while True:
            chunk = os.read(self._replies_r, 1 << 16)
            if not chunk:
                return
            buffer += chunk
            while b"\0" in buffer:
                message, buffer = buffer.split(b"\0", 1)
                reply = json.loads(message)
                if "id" in reply:
                    with self._lock:
                        waiting = self._replies.get(reply["id"])
                    if waiting is not None:
                        waiting.put(reply)

    def send(self, method: str, session: str | None = None, timeout: float = 30,
             **params: Any) -> dict[str, Any]:
        with self._lock:
            self._next_id += 1
            number = self._next_id
            self._replies[number] = queue.Queue()
        message = {"id": number, "method": method, "params": params}
        if session:
            message["sessionId"] = session
        os.write(self._commands_w, json.dumps(message).encode() + b"\0")
        try:
            reply = self._replies[number].get(timeout=timeout)
        except queue.Empty:
            raise DashboardCheckError(f"the browser did not answer {method}") from None
        if "error" in reply:
            raise DashboardCheckError(f"{method}: {reply['error']}")
        return reply.get("result", {})

    def _attach(self) -> str:
        pages = [t for t in self.send("Target.getTargets")["targetInfos"] if t["type"] == "page"]
        session = self.send("Target.attachToTarget", targetId=pages[0]["targetId"],
                            flatten=True)["sessionId"]
        self.send("Page.enable", session)
        self.send("Runtime.enable", session)
        return session

    def page(self, method: str, **params: Any) -> dict[str, Any]:
        return self.send(method, self.session, **params)

    def evaluate(self, expression: str) -> Any:
        result = self.page("Runtime.evaluate", expression=expression, returnByValue=True,
                           awaitPromise=True)
        if "exceptionDetails" in result:
            raise DashboardCheckError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def goto(self, url: str) -> None:
        self.page("Page.navigate", url=url)

    def text(self) -> str:
        """The page's visible text; "" while it is navigating (the login reloads it)."""
        try:
            return self.evaluate("document.body ? document.body.innerText : ''") or ""
        except DashboardCheckError:
            return ""

    def wait_for(self, condition, timeout: float, what: str) -> None:
        if not poll_until(lambda: condition(self.text()), timeout=timeout, interval=0.25):
            raise DashboardCheckError(f"timed out waiting for {what}; the page reads:\n"
                                      + self.text()[:3000])

    def screenshot(self, path: Path) -> None:
        data = self.page("Page.captureScreenshot", format="png")["data"]
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_suffix(".tmp")
        temporary.write_bytes(base64.b64decode(data))
        os.replace(temporary, path)

    def close(self) -> None:
        try:
            self.send("Browser.close", timeout=5)
        except (DashboardCheckError, OSError):
            pass
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        for fd in (self._commands_w, self._replies_r):
            try:
                os.close(fd)
            except OSError:
                pass


def find_browser() -> str | None:
    return next((path for name in BROWSERS if (path := shutil.which(name))), None)


# -- the dashboard --------------------------------------------------------------------------
def auth_token() -> str:
    """What `ray get-auth-token` prints, as a user would get it; never echoed."""
    ray_cli = Path(sys.executable).with_name("ray")
    result = subprocess.run([str(ray_cli) if ray_cli.exists() else "ray", "get-auth-token"],
                            capture_output=True, text=True, timeout=60)
    token = result.stdout.strip()
    if result.returncode != 0 or not token:
        raise DashboardCheckError("`ray get-auth-token` printed no token (exit code "
                                  f"{result.returncode})")
    return token


def api_actors(url: str, token: str) -> list[dict[str, Any]]:
    """Ray's state API, read with the token: the actors, for the facts the page must show."""
    request = urllib.request.Request(f"{url}/api/v0/actors?limit=1000&detail=1",
                                     headers={"Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())["data"]["result"]["result"]


def api_status_without_token(url: str) -> int:
    try:
        with urllib.request.urlopen(f"{url}/api/v0/actors", timeout=30) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code


def trial_actors(actors: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The live trial actors: Tune's function trainable's class is ImplicitFunc."""
    return [a for a in actors if a.get("class_name") == "ImplicitFunc"
            and a.get("state") == "ALIVE"]


def resources_text(resources: dict[str, Any]) -> list[str]:
    """How the Actors page's "Required resources" writes the trial's request (Ray's own
    placement-group names turned back into plain ones): `"CPU": 1`, `"GPU": 0.5`."""
    wanted = {"CPU": resources.get("cpu") or 0, "GPU": resources.get("gpu") or 0}
    return [f'"{name}": {value:g}' for name, value in wanted.items() if value]


def row_text(browser: "Browser", actor_id: str) -> str:
    """The text of the Actors table's row for `actor_id` ("" when it is not shown)."""
    return browser.evaluate(
        "(() => { const row = [...document.querySelectorAll('tr')]"
        f".find(r => r.innerText.includes('{actor_id}')); return row ? row.innerText : ''; }})()"
    ) or ""


def log_in(browser: Browser, token: str) -> None:
    """Type the token into Ray's dialog and press Submit, as a person would."""
    browser.evaluate(f"document.querySelector('{TOKEN_FIELD}').focus()")
    browser.page("Input.insertText", text=token)
    clicked = browser.evaluate(
        "(() => { const b = [...document.querySelectorAll('button')]"
        ".find(b => b.innerText.trim().toLowerCase() === 'submit'); if (!b || b.disabled) return false;"
        " b.click(); return true; })()")
    if not clicked:
        raise DashboardCheckError("the dialog's Submit button is missing or disabled")


def check_dashboard(url: str, trial: str, run_dir: Path, screenshot: Path | None,
                    browser_binary: str, work: Path) -> dict[str, Any]:
    token = auth_token()
    assert api_status_without_token(url) == 401, "the dashboard API answered without a token"
    info = json.loads((run_dir / trial / "logs" / "training_info.json").read_text())
    # The trial's actor is the one in the process the trial itself recorded.
    actors = [a for a in trial_actors(api_actors(url, token)) if a.get("pid") == info["pid"]]
    if len(actors) != 1:
        raise DashboardCheckError(f"no live ImplicitFunc actor in {trial}'s process "
                                  f"{info['pid']}")
    actor = actors[0]
    # What the page must show, from the trial's own record of where it runs and what it has.
    expected = {"node id": info["node_id"], "node ip": info["node_ip"], "pid": str(info["pid"]),
                **{f"resources {r}": r for r in resources_text(info["resources"])}}
    if actor["node_id"] != info["node_id"]:
        raise DashboardCheckError(f"the trial says node {info['node_id']}, Ray says "
                                  f"{actor['node_id']}")

    browser = Browser(browser_binary, work / "profile")
    try:
        browser.goto(f"{url}/#/actors")
        browser.wait_for(lambda t: LOGIN_TITLE in t, 60, "the token dialog")
        before = browser.text()
        hidden = [v for v in (actor["actor_id"], "ImplicitFunc", info["node_id"])
                  if v in before]
        if hidden:
            raise DashboardCheckError(f"before login the page already shows {hidden}")

        log_in(browser, token)
        browser.wait_for(lambda t: LOGIN_TITLE not in t, 30, "the dialog to accept the token")
        browser.goto(f"{url}/#/actors")
        browser.wait_for(lambda t: actor["actor_id"] in t and "ImplicitFunc" in t, 60,
                         "the trial's actor in the Actors list")
        row = row_text(browser, actor["actor_id"])
        missing = [what for what, value in expected.items() if value not in row]
        if "ImplicitFunc" not in row or missing:
            raise DashboardCheckError(f"the trial's row lacks {missing or 'ImplicitFunc'}: "
                                      f"{row!r}")
        if token in browser.text():
            raise DashboardCheckError("the page shows the token")
        if screenshot is not None:
            # Wide enough for the whole row: node, CPU, memory, resources.
            browser.page("Emulation.setDeviceMetricsOverride", width=SHOT[0], height=SHOT[1],
                         deviceScaleFactor=1, mobile=False)
            time.sleep(1)
            browser.screenshot(screenshot)
    finally:
        browser.close()
    return {"url": url, "trial": trial, "actor_class": "ImplicitFunc",
            "actor_id": actor["actor_id"], **expected, "row": " | ".join(row.split()),
            "screenshot": str(screenshot) if screenshot else None}


# -- the run ---------------------------------------------------------------------------------
def run_args(data: str, log_dir: Path, epochs: int) -> list[str]:
    return ["--data", data, "--backbones", "test_mit", "--epochs", str(epochs),
            "--synthetic-images", "8", "--min-size", "64", "--max-size", "96",
            "--num-workers", "0", "--no-evaluate", "--gpus-per-trial", "0",
            "--cpus-per-trial", "1", "--log-dir", str(log_dir), "--name", "dash",
            "--verbose", "0", "--keep-checkpoints", "1"]


def check(data: str, work: Path, screenshot: Path | None, epochs: int = 30) -> dict[str, Any]:
    """Start the run, check the dashboard while its trial trains, then stop the run."""
    browser = find_browser()
    if browser is None:
        raise DashboardCheckError(f"no headless Chromium ({', '.join(BROWSERS)}); run "
                                  "setup.sh or `apt-get install -y chromium-headless-shell`")
    log_dir = work / "logs"
    command = start(run_args(data, log_dir, epochs), work, "command")
    try:
        found: dict[str, str] = {}

        def dashboard_logged() -> bool:
            match = DASHBOARD_LINE.search(command.stderr)
            if match:
                found["url"] = match.group(1).rstrip(".,)")
            return bool(match)

        if not poll_until(dashboard_logged, timeout=180, process=command.process):
            raise DashboardCheckError("the command logged no dashboard URL:\n"
                                      + command.stderr[-3000:])
        info = log_dir / "dash" / "test_mit" / "logs" / "training_info.json"
        if not poll_until(lambda: json.loads(info.read_text()).get("train_started_at"),
                          timeout=180, process=command.process):
            raise DashboardCheckError("the trial did not start training:\n"
                                      + command.stderr[-3000:])
        return check_dashboard(found["url"], "test_mit", log_dir / "dash", screenshot, browser,
                               work)
    finally:
        command.kill()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", help="dataset folder (default: a tiny synthetic one)")
    parser.add_argument("--screenshot", type=Path, help="save the logged-in Actors page here")
    parser.add_argument("--epochs", type=int, default=30,
                        help="epochs of the run (it is stopped once checked)")
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="crossdet_dashboard_"))
    try:
        data = args.data
        if data is None:
            from crossdet_ray.data.synthetic import generate_dataset

            data = str(generate_dataset(work / "data", 8, seed=0))
        result = check(data, work, args.screenshot, args.epochs)
    except DashboardCheckError as error:
        print(f"dashboard check FAILED: {error}", file=sys.stderr)
        return 1
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
