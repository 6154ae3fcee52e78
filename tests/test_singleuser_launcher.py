"""aifab-singleuser: the deferred import keeps behaviour, and the port report is checked."""

from __future__ import annotations

import subprocess
import sys

CHECK = """
import sys, time
from aifab.spawners.singleuser import defer_rfc3987_syntax
defer_rfc3987_syntax()
t0 = time.perf_counter()
import jsonschema, jupyter_events  # what jupyter_server imports at start-up
imported = time.perf_counter() - t0
assert type(sys.modules['rfc3987_syntax']).__name__ == 'module'
stub = sys.modules['rfc3987_syntax']
checker = jsonschema.Draft202012Validator.FORMAT_CHECKER
assert checker.conforms('https://example.org/ä', 'iri')
assert not checker.conforms('not an iri', 'iri')
assert sys.modules['rfc3987_syntax'] is not stub  # the real module took over
print(round(imported, 3))
"""


def test_iri_format_check_still_works_after_deferring():
    out = subprocess.run([sys.executable, "-c", CHECK], capture_output=True, text=True,
                         timeout=120, cwd="/")
    assert out.returncode == 0, out.stderr
    assert float(out.stdout) < 5


def test_a_refused_port_report_stops_the_launcher():
    env = {"JUPYTERHUB_API_URL": "http://127.0.0.1:9/hub/api",  # nothing listens on port 9
           "JUPYTERHUB_API_TOKEN": "x", "JUPYTERHUB_SERVICE_URL": "http://127.0.0.1:0/user/a/",
           "PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, "-m", "aifab.spawners.singleuser", "true"],
                         env=env, capture_output=True, text=True, timeout=60, cwd="/")
    assert out.returncode != 0
    assert "Connection refused" in out.stderr


def test_usage_without_a_command():
    out = subprocess.run([sys.executable, "-m", "aifab.spawners.singleuser"], capture_output=True,
                         text=True, timeout=60, cwd="/")
    assert out.returncode == 1 and "usage: aifab-singleuser" in out.stderr
