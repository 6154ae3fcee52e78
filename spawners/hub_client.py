"""A person's path through a hub, without a browser: log in with the form, press Start on
the options form, follow the redirects into JupyterLab. Uses requests with cookies and the
hub's XSRF token, exactly as the pages do. ``aifab loadtest`` and the tests walk it."""

from __future__ import annotations

import re
import time

import requests


class HubSession:
    def __init__(self, base_url: str):
        self.base = base_url.rstrip("/")
        self.http = requests.Session()

    def _xsrf(self) -> str:
        token = self.http.cookies.get("_xsrf", path="/hub/")
        if token is None:
            token = next((c.value for c in self.http.cookies if c.name == "_xsrf"), None)
        if not token:
            raise RuntimeError("the hub set no _xsrf cookie (is this a JupyterHub login page?)")
        return token

    def login(self, username: str, password: str) -> requests.Response:
        page = self.http.get(f"{self.base}/hub/login", timeout=30)
        page.raise_for_status()
        r = self.http.post(f"{self.base}/hub/login?next=", timeout=30, data={
            "username": username, "password": password, "_xsrf": self._xsrf()})
        return r  # 403 with the login page again when refused

    def options_form(self, username: str) -> str:
        r = self.http.get(f"{self.base}/hub/spawn/{username}", timeout=30)
        r.raise_for_status()
        return r.text

    def press_start(self, username: str, form: dict) -> requests.Response:
        """POST the options form (what the Start button does); follows to spawn-pending."""
        return self.http.post(f"{self.base}/hub/spawn/{username}", timeout=60,
                              data={**form, "_xsrf": self._xsrf()})

    def wait_ready(self, username: str, timeout: float = 90) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            r = self.http.get(f"{self.base}/hub/api/users/{username}", timeout=30,
                              headers={"X-XSRFToken": self._xsrf()})
            r.raise_for_status()
            srv = r.json().get("servers", {}).get("")
            if srv and srv.get("ready"):
                return srv
            time.sleep(0.2)
        raise TimeoutError(f"{username}'s server not ready after {timeout}s")

    def new_token(self, username: str, note: str) -> tuple[str, str]:
        """An API token of this user and its id, made with their login (it has the user's
        own permissions: their server, their kernels), for the REST calls that follow."""
        r = self.http.post(f"{self.base}/hub/api/users/{username}/tokens", timeout=30,
                           json={"note": note, "expires_in": 3600},
                           headers={"X-XSRFToken": self._xsrf()})
        r.raise_for_status()
        return r.json()["token"], r.json()["id"]

    def open(self, path: str) -> requests.Response:
        """GET a page behind the proxy (follows the OAuth redirects into the server)."""
        return self.http.get(f"{self.base}{path}", timeout=60)


def form_fields(html: str) -> dict[str, str]:
    """The default values of an options form's inputs (radio: the checked one)."""
    fields: dict[str, str] = {}
    for m in re.finditer(r"<input([^>]*)>", html):
        attrs = dict(re.findall(r'(\w+)="([^"]*)"', m.group(1)))
        name = attrs.get("name")
        if not name or name == "_xsrf":
            continue
        if attrs.get("type") == "radio":
            if " checked" in m.group(1):
                fields[name] = attrs.get("value", "")
        else:
            fields[name] = attrs.get("value", "")
    for m in re.finditer(r'<select name="([^"]+)">(.*?)</select>', html, re.S):
        sel = re.search(r'<option value="([^"]*)" selected', m.group(2))
        if sel:
            fields[m.group(1)] = sel.group(1)
    return fields
