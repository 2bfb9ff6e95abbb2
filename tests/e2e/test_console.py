"""`shieldkey console` against a real Envoy, driven by a real headless browser (Debian's chromium
and chromium-driver, with selenium): log in with the one-time secret the console printed, see a
token's spend equal to Envoy's stat, open the token, revoke it through the confirm step and see
Envoy apply the revision, after which Envoy refuses the token; forged and session-less POSTs
change nothing; a token minted in the browser is shown once and works; and no log, stat, page or
audit record holds a secret (the one page that shows the minted token excepted)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.parse
import urllib.request

import pytest

from deployment import CLI, Deployment, error_code, request, wait_token_stat

selenium = pytest.importorskip("selenium")
from selenium import webdriver  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support import expected_conditions as EC  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

SMALL_IN, SMALL_OUT = 150, 600  # nano-USD per token of mistral-small-latest
ONE = 10 * SMALL_IN + 500 * SMALL_OUT


def chat() -> dict:
    return {"model": "mistral-small-latest", "max_tokens": 500,
            "messages": [{"role": "user", "content": "hi"}]}


def browser_binaries() -> tuple[str, str]:
    chromium = shutil.which("chromium") or "/usr/bin/chromium"
    driver = shutil.which("chromedriver") or "/usr/bin/chromedriver"
    if not (os.path.exists(chromium) and os.path.exists(driver)):
        pytest.fail("chromium and chromium-driver are missing: run scripts/setup.sh")
    return chromium, driver


class Console:
    """`shieldkey console` as a process; its stderr is collected line by line."""

    def __init__(self, dep: Deployment, *args: str):
        env = dict(os.environ)
        env.update(dep.env)
        env["SHIELDKEY_POLICY"] = str(dep.policy)
        for name in ("SHIELDKEY_PUBLISH", "SHIELDKEY_ADMIN", "SHIELDKEY_CONSOLE_PASSWORD"):
            env.pop(name, None)
        self.proc = subprocess.Popen([str(CLI), "console", "--listen", "127.0.0.1:0", *args],
                                     cwd=dep.workdir, env=env, stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        self.lines: list[str] = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()
        deadline = time.monotonic() + 20
        while not self.secret():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"the console did not start:\n{self.stderr}")
            time.sleep(0.02)
        url_line = next(l for l in self.lines if l.startswith("shieldkey console: "))
        self.url = url_line.split(": ", 1)[1].strip().rstrip("/")

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.append(line)

    @property
    def stderr(self) -> str:
        return "".join(self.lines)

    def secret(self) -> str | None:
        for line in self.lines:
            if line.startswith("login secret (one-time): "):
                return line.split(": ", 1)[1].strip()
        return None

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.reader.join(timeout=5)


def post(url: str, form: dict, cookie: str | None = None) -> tuple[int, str]:
    """A POST as a script would send it (no browser headers)."""
    req = urllib.request.Request(url, data=urllib.parse.urlencode(form).encode(), method="POST")
    req.add_header("content-type", "application/x-www-form-urlencoded")
    if cookie:
        req.add_header("cookie", cookie)
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


@pytest.fixture()
def browser():
    chromium, driver = browser_binaries()
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage",
                "--window-size=1400,1000", "--disable-gpu"):
        options.add_argument(arg)
    drv = webdriver.Chrome(service=Service(driver), options=options)
    drv.set_page_load_timeout(30)
    yield drv
    drv.quit()


@pytest.fixture()
def dep(tmp_path, mock_mistral, mock_keys):
    d = Deployment(tmp_path, mock_mistral, mock_keys)
    d.cli("team", "create", "eng", "--description", "Engineering")
    d.mint("ann", "prod", "--owner", "ann@example.com", "--team", "eng",
           "--budget-usd", "1", "--budget-window", "daily")
    d.mint("bob", "prod", "--owner", "bob@example.com")
    yield d
    d.stop()


def test_the_console_in_a_browser_revokes_mints_and_never_shows_a_secret(
        dep, mock_mistral, mock_keys, browser):
    dep.start()
    mock_mistral.behaviour(usage={"prompt_tokens": 10, "completion_tokens": 500})
    for token_id in ("ann", "ann", "bob"):
        status, _, body = request(dep.url, token=dep.tokens[token_id], body=chat())
        assert status == 200, body
    assert wait_token_stat(dep, "ann", "spend_nano_usd", 2 * ONE) == 2 * ONE
    assert wait_token_stat(dep, "bob", "spend_nano_usd", ONE) == ONE
    dep.envoy.wait_audit(3)

    admin = f"http://127.0.0.1:{dep.envoy.admin_port}"
    console = Console(dep, "--publish", str(dep.ecds), "--admin", admin,
                      "--audit-log", str(dep.workdir / "shieldkey-audit.log"))
    pages: list[str] = []  # every page the browser saw, but the one-time mint page
    shots = os.environ.get("SHIELDKEY_CONSOLE_SCREENSHOTS")  # a directory, to look at the pages

    def shot(name: str) -> None:
        if shots:
            browser.save_screenshot(os.path.join(shots, f"{name}.png"))

    try:
        wait = WebDriverWait(browser, 15)

        # Not logged in: the console sends the browser to its login page.
        browser.get(console.url + "/")
        wait.until(EC.presence_of_element_located((By.ID, "secret")))
        assert browser.current_url.endswith("/login")
        pages.append(browser.page_source)
        browser.find_element(By.ID, "secret").send_keys(console.secret())
        browser.find_element(By.ID, "login").click()
        wait.until(EC.presence_of_element_located((By.CSS_SELECTOR, "tr[data-token=ann]")))
        pages.append(browser.page_source)
        shot("overview")

        # The overview: ann's spend in its window is Envoy's, exactly; her team above her.
        row = browser.find_element(By.CSS_SELECTOR, "tr[data-token=ann]")
        spend = row.find_element(By.CSS_SELECTOR, ".spend")
        stat = dep.envoy.stat("wasmcustom.shieldkey.token_id.ann.budget_spent_nano_usd")
        assert int(spend.get_attribute("data-spent-nano-usd")) == stat == 2 * ONE
        assert "$0.000603 of $1.00" in spend.text, spend.text
        assert "ann@example.com" in row.text and "active" in row.text
        assert "Team eng" in browser.find_element(By.CSS_SELECTOR, "tr.team").text
        bob = browser.find_element(By.CSS_SELECTOR, "tr[data-token=bob]")
        assert int(bob.find_element(By.CSS_SELECTOR, ".spend").get_attribute(
            "data-spent-nano-usd")) == dep.envoy.stat(
            "wasmcustom.shieldkey.token_id.bob.spend_nano_usd") == ONE

        # ann's page: her recent requests from the audit log, then revoke with a confirm step.
        row.find_element(By.LINK_TEXT, "ann").click()
        wait.until(EC.presence_of_element_located((By.ID, "revoke")))
        assert len(browser.find_elements(By.CSS_SELECTOR, "table.records tbody tr")) == 2
        pages.append(browser.page_source)
        shot("token")
        revision = dep.revision()
        browser.find_element(By.ID, "revoke").click()
        wait.until(EC.presence_of_element_located((By.ID, "confirm")))
        assert "Revoke token ann?" in browser.find_element(By.TAG_NAME, "h1").text
        assert dep.revision() == revision, "the confirm step changes nothing"
        pages.append(browser.page_source)
        browser.find_element(By.ID, "confirm").click()
        flash = wait.until(EC.presence_of_element_located((By.CSS_SELECTOR, ".flash.ok")))
        assert dep.revision() == revision + 1
        assert f"Applied by Envoy: revision {revision + 1}" in flash.text, flash.text
        assert "Revoked token 'ann'" in flash.text
        pages.append(browser.page_source)
        shot("revoked")
        status, _, body = request(dep.url, token=dep.tokens["ann"], body=chat())
        assert (status, error_code(body)) == (401, "shield_token_revoked")

        # Forged: the session's cookie with a wrong CSRF token, and no session at all: 403,
        # the policy's revision stays, bob still works.
        cookie = next(c for c in browser.get_cookies() if c["name"] == "shieldkey_console")
        assert cookie["httpOnly"] and cookie["sameSite"] == "Strict"
        session = f"shieldkey_console={cookie['value']}"
        revision = dep.revision()
        for form, with_cookie in (({"csrf": "forged"}, True), ({}, True),
                                  ({"csrf": "forged"}, False)):
            status, page = post(console.url + "/tokens/bob/revoke", form,
                                session if with_cookie else None)
            assert status == 403, (form, with_cookie, page)
            pages.append(page)
        status, page = post(console.url + "/mint", {"csrf": "forged", "form_id": "x",
                                                    "id": "mallory", "upstream_key": "prod"},
                            session)
        assert status == 403
        pages.append(page)
        assert dep.revision() == revision
        assert request(dep.url, token=dep.tokens["bob"], body=chat())[0] == 200

        # Mint in the browser: the token is shown once, on the page right after.
        browser.get(console.url + "/")
        wait.until(EC.presence_of_element_located((By.CSS_SELECTOR, "a[data-open=mint]")))
        pages.append(browser.page_source)
        browser.find_element(By.CSS_SELECTOR, "a[data-open=mint]").click()
        browser.find_element(By.NAME, "id").send_keys("carol")
        browser.find_element(By.NAME, "owner").send_keys("carol@example.com")
        browser.find_element(By.NAME, "rpm").send_keys("30")
        browser.find_element(By.ID, "mint-submit").click()
        field = wait.until(EC.presence_of_element_located((By.ID, "minted-token")))
        minted = field.get_attribute("value")
        assert minted.startswith("sk_shield_t_carol_"), minted
        minted_page = browser.page_source
        shot("minted")
        assert minted_page.count(minted) == 1
        assert f"Applied by Envoy: revision {revision + 1}" in minted_page
        assert "shown once" in minted_page
        dep.tokens["carol"] = minted
        # Reload (the browser sends the form again: that form was used), back, forward: the
        # token is never shown again.
        browser.refresh()
        wait.until(EC.presence_of_element_located((By.TAG_NAME, "h1")))
        assert minted not in browser.page_source
        assert "already used" in browser.page_source
        pages.append(browser.page_source)
        browser.back()
        wait.until(EC.presence_of_element_located((By.TAG_NAME, "h1")))
        assert minted not in browser.page_source
        pages.append(browser.page_source)
        browser.forward()
        time.sleep(0.5)
        assert minted not in browser.page_source
        pages.append(browser.page_source)
        browser.get(console.url + "/tokens/carol")
        wait.until(EC.presence_of_element_located((By.ID, "revoke")))
        assert minted not in browser.page_source and "rpm 30" in browser.page_source
        pages.append(browser.page_source)
        # The minted token works against Envoy.
        status, _, body = request(dep.url, token=minted, body=chat())
        assert status == 200, body
        dep.envoy.wait_audit(6)
        browser.get(console.url + "/tokens/carol")
        wait.until(EC.presence_of_element_located((By.ID, "revoke")))
        pages.append(browser.page_source)
    finally:
        console.stop()

    # Nothing secret anywhere: Envoy's log, its stats and config dump, every page, the audit
    # log, the console's own stderr.
    secrets = {"master key": dep.master_key}
    for name, key in mock_keys.items():
        secrets[f"upstream key {name}"] = key
    for token_id, token in dep.tokens.items():
        secrets[f"token {token_id}"] = token
        secrets[f"secret of {token_id}"] = token[len(f"sk_shield_t_{token_id}_"):]
    places = {
        "Envoy's log": dep.envoy.log_text(),
        "/stats": dep.envoy.admin_get("/stats"),
        "/stats/prometheus": dep.envoy.admin_get("/stats/prometheus"),
        "/config_dump": dep.envoy.admin_get("/config_dump"),
        "audit log": (dep.workdir / "shieldkey-audit.log").read_text(),
        "console stderr": console.stderr,
    }
    for n, page in enumerate(pages):
        places[f"page {n}"] = page
    assert len(places["audit log"].splitlines()) >= 6
    for where, text in places.items():
        for what, secret in secrets.items():
            assert secret not in text, f"{what} found in {where}"
    # The console said what it did, and nothing more.
    assert "Revoked token 'ann'" in console.stderr and "refused" in console.stderr


def test_slow_and_flooding_clients_neither_hold_nor_kill_the_console(dep):
    """A client that never finishes its request headers is closed after the header timeout
    (10 s); a flood of such connections beyond the connection cap is refused at once, and the
    console serves again once they are closed."""
    console = Console(dep)
    try:
        host, port = urllib.parse.urlsplit(console.url).netloc.split(":")

        def login_page() -> int:
            with urllib.request.urlopen(console.url + "/login", timeout=5) as r:
                return r.status

        assert login_page() == 200
        slow = [socket.create_connection((host, int(port)), timeout=20) for _ in range(80)]
        for s in slow:
            s.sendall(b"GET / HTTP/1.1\r\nhost: 127.0.0.1\r\n")
        started = time.monotonic()
        # The first of them is closed by the console, without an answer, within the timeout.
        try:
            closed = slow[0].recv(100) == b""
        except ConnectionResetError:
            closed = True
        assert closed and time.monotonic() - started < 15
        for s in slow:
            s.close()
        deadline = time.monotonic() + 5
        while True:
            try:
                assert login_page() == 200
                break
            except (urllib.error.URLError, ConnectionError):
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        assert console.proc.poll() is None
    finally:
        console.stop()


def test_a_remote_console_answers_only_its_public_host_names(dep):
    """With --allow-remote, --public-host names the hosts the console is reached under: a page
    that rebinds its own name to the console's address gets 421, not the login page."""
    refused = subprocess.run([str(CLI), "console", "--public-host", "console.example"],
                             env={**os.environ, "SHIELDKEY_POLICY": str(dep.policy)},
                             capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=20)
    assert refused.returncode == 2 and "--allow-remote" in refused.stderr
    console = Console(dep, "--allow-remote", "--public-host", "Console.Example,192.0.2.7")
    try:
        assert "no --public-host" not in console.stderr

        def status_for(host: str) -> int:
            req = urllib.request.Request(console.url + "/login", headers={"host": host})
            try:
                with urllib.request.urlopen(req, timeout=5) as r:
                    return r.status
            except urllib.error.HTTPError as e:
                return e.code

        for host in ("console.example", "CONSOLE.EXAMPLE:443", "192.0.2.7:8484", "127.0.0.1"):
            assert status_for(host) == 200, host
        for host in ("evil.example", "console.example.evil.example", "192.0.2.8"):
            assert status_for(host) == 421, host
    finally:
        console.stop()
    # Without --public-host every name is answered, and the console says so when it starts.
    anyhost = Console(dep, "--allow-remote")
    try:
        assert "warning: no --public-host" in anyhost.stderr
    finally:
        anyhost.stop()
