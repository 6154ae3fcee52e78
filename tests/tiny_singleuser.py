#!/usr/bin/env python3
"""A stand-in for jupyterhub-singleuser when what is measured is the hub and Slurm: it
answers every HTTP request on the port that aifab-singleuser (or batchspawner-singleuser)
reported to the hub, so the hub sees a server up, and runs nothing else. Twenty or fifty
real Jupyter servers would measure two CPU cores, not the hub."""

import json
import os
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlparse


class Up(BaseHTTPRequestHandler):
    def do_GET(self):
        body = json.dumps({"version": "tiny"}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


if __name__ == "__main__":
    url = urlparse(os.environ["JUPYTERHUB_SERVICE_URL"])
    ThreadingHTTPServer((url.hostname or "127.0.0.1", url.port), Up).serve_forever()
