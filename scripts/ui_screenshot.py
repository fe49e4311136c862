"""MLflow's UI in headless Chromium, as a new user meets it: which sidebar (Model training or
GenAI) the runs page, a run's page and the Models page show, with a screenshot of each.

    python scripts/ui_screenshot.py --store sqlite:///mlruns/mlflow.db --out /tmp/ui   # starts mlflow ui
    python scripts/ui_screenshot.py --url http://127.0.0.1:5000 --out /tmp/ui           # a running one

The browser starts with an empty profile. It opens the README's link, clicks the newest run,
opens the Models page, then clicks the sidebar's "Model training" switch once (MLflow keeps that
choice in the browser's localStorage) and opens the run and the Models page again. It prints one
JSON object: per page its URL, the sidebar's view and items, the run page's metric groups in
order, and the screenshot's path. Needs `chromium` (Debian: apt-get install chromium); talks to
it over the DevTools protocol with aiohttp, which MLflow depends on. See docs/ui.md.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import aiohttp

STORED = "mlflow.workflowType_v1"  # MLflow 3.17's localStorage key for the sidebar's switch
# What each view's sidebar alone lists: GenAI has no Model registry, model training no Prompts.
ONLY_IN = {"model training": {"Model registry"}, "genai": {"Prompts", "Evaluation runs", "Playground"}}
STATE = """(() => {
  const nav = document.querySelector('nav');
  const items = nav ? nav.innerText.split('\\n').map(s => s.trim()).filter(Boolean) : [];
  const main = document.body.innerText;
  const groups = ['Model metrics (', 'System metrics ('].map(h => [h.slice(0, -2), main.indexOf(h)])
    .filter(([, at]) => at >= 0).sort((a, b) => a[1] - b[1]).map(([h]) => h);
  return {url: location.href, items, stored: localStorage.getItem('KEY'), metric_groups: groups};
})()""".replace("KEY", STORED)


def view(items: list[str]) -> str:
    found = [name for name, only in ONLY_IN.items() if only & set(items)]
    return found[0] if len(found) == 1 else "unknown"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_ui(store: str, port: int, timeout_s: float = 180) -> subprocess.Popen:
    """`mlflow ui` on 127.0.0.1:port, one worker, once it answers (about 40 s on 2 cores); in a
    session of its own, as it starts workers: stop_ui ends them all."""
    mlflow = Path(sys.executable).with_name("mlflow")
    server = subprocess.Popen([str(mlflow), "ui", "--backend-store-uri", store, "--host", "127.0.0.1",
                               "--port", str(port), "--workers", "1"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
                              env={**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"})
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and server.poll() is None:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
            return server
        except OSError:
            time.sleep(1)
    stop_ui(server)
    raise RuntimeError(f"mlflow ui on port {port} did not answer within {timeout_s:.0f} s")


def stop_ui(server: subprocess.Popen) -> None:
    try:
        os.killpg(server.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    try:
        server.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(server.pid, signal.SIGKILL)
        server.wait()


class Page:
    """One Chromium tab over the DevTools protocol: navigate, evaluate, click, screenshot."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse):
        self.ws, self.next_id = ws, 0

    async def call(self, method: str, **params) -> dict:
        self.next_id += 1
        await self.ws.send_json({"id": self.next_id, "method": method, "params": params})
        async for msg in self.ws:
            data = json.loads(msg.data)
            if data.get("id") == self.next_id:
                if "error" in data:
                    raise RuntimeError(f"{method}: {data['error']}")
                return data["result"]
        raise RuntimeError("Chromium closed the DevTools connection")

    async def js(self, expression: str):
        result = await self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        return result["result"].get("value")

    async def wait_for(self, expression: str, timeout_s: float = 60) -> None:
        deadline = time.monotonic() + timeout_s
        while not await self.js(expression):
            if time.monotonic() > deadline:
                raise TimeoutError(f"not within {timeout_s:.0f} s: {expression}")
            await asyncio.sleep(0.5)
        await asyncio.sleep(1.5)  # the sidebar and tables settle

    async def click(self, tag: str, text: str) -> None:
        """A click on the first visible `tag` element whose text is `text` (React Router's links
        and the switch handle it as a user's)."""
        found = await self.js(f"""(() => {{ const e = [...document.querySelectorAll({json.dumps(tag)})]
            .find(e => e.innerText.trim() === {json.dumps(text)} && e.offsetParent);
            if (e) e.click(); return Boolean(e); }})()""")
        if not found:
            raise LookupError(f"no {tag} reading {text!r} on {await self.js('location.href')}")

    async def shoot(self, path: Path) -> str:
        shot = await self.call("Page.captureScreenshot", format="png")
        path.write_bytes(base64.b64decode(shot["data"]))
        return str(path)

    async def record(self, name: str, out: Path) -> dict:
        state = await self.js(STATE)
        state = {**state, "view": view(state["items"]), "screenshot": await self.shoot(out / f"{name}.png")}
        if state["metric_groups"]:  # a run's page: its metrics table too, scrolled into view
            await self.js("document.querySelector('input[placeholder=\"Search metrics\"]')"
                          ".scrollIntoView({block: 'start'})")
            await asyncio.sleep(1)
            state["metrics_screenshot"] = await self.shoot(out / f"{name}-metrics.png")
        return state


def has_text(text: str) -> str:
    return f"document.body.innerText.includes({json.dumps(text)}) && !!document.querySelector('nav')"


async def walk(base: str, page: Page, out: Path, experiment_id: str, run_id: str, run_name: str) -> dict:
    steps = {}

    async def visit(name: str, url: str | None, ready: str) -> None:
        if url is not None:
            await page.call("Page.navigate", url=base + url)
        await page.wait_for(ready)
        steps[name] = await page.record(name, out)

    experiment, readme = f"/#/experiments/{experiment_id}", f"/#/experiments/{experiment_id}/runs"
    # The bare link: the experiment's mlflow.experimentKind tag is not what MLflow 3.17 goes by.
    redirected = "location.href.includes('workflowType=') && !!document.querySelector('nav')"
    await visit("0-experiment", experiment, redirected)
    await visit("1-runs-readme-link", readme + "?workflowType=machine_learning", has_text(run_name))
    await page.click("a", run_name)  # as a user opens it
    await visit("2-run-clicked", None, has_text("About this run"))
    await visit("2b-run-link", f"{readme}/{run_id}?workflowType=machine_learning", has_text("About this run"))
    await visit("3-models-link", "/#/models?workflowType=machine_learning", has_text("Registered Models"))
    await visit("4-models", "/#/models", has_text("Registered Models"))
    # The documented fix: the switch, clicked where it reads GenAI, is what MLflow remembers.
    await page.click("[role=button]", "Model training")
    await page.wait_for(f"localStorage.getItem('{STORED}') === '\"machine_learning\"'", timeout_s=15)
    await visit("5-experiment-after-switch", experiment, has_text(run_name))
    await page.click("a", run_name)
    await visit("6-run-after-switch", None, has_text("About this run"))
    await page.click("a", "Model registry")
    await visit("7-models-after-switch", None, has_text("Registered Models"))
    return steps


async def check(base: str, out: Path, experiment_id: str, run_id: str, run_name: str,
                chromium: str = "chromium") -> dict:
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="ui-chromium-") as profile:
        browser = subprocess.Popen([chromium, "--headless=new", "--no-sandbox", "--disable-gpu",
                                    "--no-first-run", "--window-size=1400,1000", f"--user-data-dir={profile}",
                                    "--remote-debugging-address=127.0.0.1", "--remote-debugging-port=0",
                                    "about:blank"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            active = Path(profile) / "DevToolsActivePort"
            for _ in range(60):
                if active.exists() and active.read_text().strip():
                    break
                await asyncio.sleep(0.5)
            port = active.read_text().split()[0]
            async with aiohttp.ClientSession() as http:
                async with http.get(f"http://127.0.0.1:{port}/json/list") as response:
                    target = next(t for t in await response.json() if t["type"] == "page")
                async with http.ws_connect(target["webSocketDebuggerUrl"], max_msg_size=0) as ws:
                    return await walk(base, Page(ws), out, experiment_id, run_id, run_name)
        finally:
            browser.terminate()
            browser.wait(timeout=30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--store", help="a backend store URI: start `mlflow ui` on it (127.0.0.1, a free port)")
    where.add_argument("--url", help="a running MLflow UI, e.g. http://127.0.0.1:5000")
    parser.add_argument("--out", type=Path, default=Path("ui_screenshots"), help="where the PNGs go")
    parser.add_argument("--experiment", default="mnist-vae")
    args = parser.parse_args()
    if not (chromium := shutil.which("chromium") or shutil.which("chromium-browser")):
        sys.exit("error: chromium is not installed (Debian: apt-get install chromium)")
    server = None
    if args.store:
        port = free_port()
        server, base = start_ui(args.store, port), f"http://127.0.0.1:{port}"
    else:
        base = args.url.rstrip("/")
    try:
        import mlflow

        client = mlflow.MlflowClient(args.store or base)
        experiment = client.get_experiment_by_name(args.experiment)
        runs = client.search_runs([experiment.experiment_id], order_by=["attributes.start_time DESC"])
        newest = next(run for run in runs if "mlflow.parentRunId" not in run.data.tags)
        pages = asyncio.run(check(base, args.out, experiment.experiment_id, newest.info.run_id,
                                  newest.info.run_name, chromium))
    finally:
        if server is not None:
            stop_ui(server)
    print(json.dumps(pages, indent=1))


if __name__ == "__main__":
    main()
