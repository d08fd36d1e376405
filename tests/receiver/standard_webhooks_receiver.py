#!/usr/bin/env python3
"""A merchant's webhook receiver for the tests: every request is verified with the Standard
Webhooks reference library (`standardwebhooks` on PyPI), not with our code.

    standard_webhooks_receiver.py --port P --secret whsec_... [--delay SECONDS]

POST anything: verified (signature, timestamp, id headers) -> 204 and kept; refused -> 400.
GET /received: {"accepted": [{"id", "type", "orderId", "at"}], "rejected": N}.
"""
import argparse
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from standardwebhooks.webhooks import Webhook, WebhookVerificationError

lock = threading.Lock()
accepted = []
rejected = 0


def handler(webhook, delay):
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            global rejected
            length = int(self.headers.get("content-length", "0"))
            body = self.rfile.read(length)
            if delay:
                time.sleep(delay)
            try:
                payload = webhook.verify(body, dict(self.headers))
            except WebhookVerificationError:
                with lock:
                    rejected += 1
                self.send_response(400)
                self.end_headers()
                return
            with lock:
                accepted.append({
                    "id": self.headers["webhook-id"],
                    "type": payload.get("type"),
                    "orderId": payload.get("data", {}).get("orderId"),
                    "at": time.time(),
                })
            self.send_response(204)
            self.end_headers()

        def do_GET(self):
            with lock:
                body = json.dumps({"accepted": accepted, "rejected": rejected}).encode()
            self.send_response(200)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    return Handler


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--secret", required=True)
    parser.add_argument("--delay", type=float, default=0.0)
    args = parser.parse_args()
    server = ThreadingHTTPServer(("127.0.0.1", args.port), handler(Webhook(args.secret), args.delay))
    server.daemon_threads = True
    server.serve_forever()


if __name__ == "__main__":
    main()
