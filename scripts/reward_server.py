"""Serve a reward over HTTP for `g2rpo.http_reward` (``rewards: [{name: http, args: {url: http://host:port}}]``).

    python scripts/reward_server.py --reward hps --models-config configs/models/tiny.yaml --port 8123
    python scripts/reward_server.py --reward my_rewards.brightness:build --args '{"target": 0.8}' --port 8123
    python scripts/reward_server.py --reward unifiedreward --models-config configs/models/flux_dev.yaml \
        --device cuda --host 0.0.0.0 --port 8123     # a judge in its own environment, or on another machine

Serves any registry reward or ``package.module:factory`` (g2rpo.reward_plugins): ``GET /health`` answers
``{"status": "ok", "reward": <name>}``, ``POST /score`` takes ``{"prompts", "images": [base64 PNG/JPEG],
"format"}`` and answers ``{"scores": [...]}`` (null for a NaN score). JSON only, never pickle. Requests are scored
one at a time (the models are not thread-safe); a malformed request gets 400 with the reason, a failure while
scoring 500. Only the Python standard library's HTTP server: put it behind your own proxy to expose it beyond a
trusted network.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MAX_BODY = 512 * 2**20  # 512 MiB: a batch of large PNGs, not more


def make_server(reward, name: str, host: str = "127.0.0.1", port: int = 0) -> ThreadingHTTPServer:
    """A server scoring with ``reward`` (anything with ``score(images, prompts)``); ``port`` 0 picks a free one
    (``server.server_address``). Call ``serve_forever()`` to serve."""
    from g2rpo.http_reward import decode_images

    lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        def _send(self, code: int, body: dict) -> None:
            data = json.dumps(body).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self):  # noqa: N802 -- the http.server name
            if self.path.rstrip("/") == "/health":
                self._send(200, {"status": "ok", "reward": name})
            else:
                self._send(404, {"error": f"no {self.path}; GET /health, POST /score"})

        def do_POST(self):  # noqa: N802
            if self.path.rstrip("/") != "/score":
                return self._send(404, {"error": f"no {self.path}; POST /score"})
            try:
                length = int(self.headers.get("Content-Length", "0"))
                if not 0 < length <= MAX_BODY:
                    raise ValueError(f"Content-Length {length}: expected 1..{MAX_BODY}")
                request = json.loads(self.rfile.read(length))
                prompts, images = request["prompts"], request["images"]
                if not isinstance(prompts, list) or not isinstance(images, list) or len(prompts) != len(images):
                    raise ValueError("expected lists 'prompts' and 'images' of one length")
                pixels = decode_images(images)
            except (ValueError, KeyError, TypeError, OSError) as exc:
                return self._send(400, {"error": f"{type(exc).__name__}: {exc}"})
            try:
                with lock:
                    scores = reward.score(pixels, [str(p) for p in prompts]).tolist()
            except Exception as exc:  # noqa: BLE001 -- reported to the client, the server keeps serving
                return self._send(500, {"error": f"{type(exc).__name__}: {exc}"})
            self._send(200, {"scores": [None if math.isnan(v) else v for v in scores]})

        def log_message(self, format, *args):  # noqa: A002 -- one line per request on stderr, not http.server's
            sys.stderr.write(f"{self.address_string()} {format % args}\n")

    return ThreadingHTTPServer((host, port), Handler)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reward", required=True, help="a registry name (hps, clip_score, pickscore, imagereward, "
                   "unifiedreward) or package.module:factory")
    p.add_argument("--args", default="{}", help="JSON object of the factory's arguments (import-path rewards)")
    p.add_argument("--models-config", type=Path, default=ROOT / "configs/models/flux_dev.yaml",
                   help="where a registry reward's files are (configs/models/*.yaml)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--host", default="127.0.0.1", help="127.0.0.1 (this machine only) or 0.0.0.0")
    p.add_argument("--port", type=int, default=8123)
    args = p.parse_args(argv)
    try:
        args.args = json.loads(args.args)
    except ValueError as exc:
        p.error(f"--args {args.args!r}: not JSON ({exc})")
    if not isinstance(args.args, dict):
        p.error(f"--args {args.args!r}: expected a JSON object")
    return args


def main(argv=None) -> None:
    from g2rpo.config import ModelsConfig, load_config
    from g2rpo.reward_plugins import resolve
    from g2rpo.reward_registry import REWARDS, missing_inputs

    args = parse_args(argv)
    entry = resolve(args.reward, args.args)
    models = load_config(ModelsConfig, args.models_config)
    missing = missing_inputs([args.reward], models) if args.reward in REWARDS else []
    if missing:
        raise FileNotFoundError(f"{args.models_config}: not found: {'; '.join(missing)}")
    server = make_server(entry.build(models, args.device), entry.name, args.host, args.port)
    host, port = server.server_address[:2]
    print(f"serving {entry.name} on http://{host}:{port} (GET /health, POST /score)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


if __name__ == "__main__":
    from g2rpo.cli import run_main

    run_main(main)
