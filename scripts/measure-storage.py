#!/usr/bin/env python3
"""Bytes per order, measured: `just measure-storage [orders]` (docs/capacity.md).

Starts its own nats-server (R1, a free port) and a fresh database, runs every role in one
`checkout run all` (and the sandbox PSP), places orders (one unit each, eight buyers in parallel), and prints what
each PostgreSQL table (heap, indexes, TOAST) and each stream grew by per order, between a
warm-up and the end. Standard library only.
"""
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

ORDERS = int(sys.argv[1]) if len(sys.argv) > 1 else 2000
WARMUP = 200
BUYERS = 8
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.join(ROOT, "target/release/checkout")
PSP = os.path.join(ROOT, "target/release/sandbox-psp")
NATS = os.path.join(ROOT, ".venv/bin/nats-server")
BASE_DB = os.environ.get("MEASURE_DATABASE", "postgres://postgres:postgres@127.0.0.1:5432")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def call(method, url, token=None, body=None, headers=None):
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method)
    req.add_header("Content-Type", "application/json")
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    for k, v in (headers or {}).items():
        req.add_header(k, v)
    with urllib.request.urlopen(req, timeout=10) as resp:
        return resp.status, json.loads(resp.read() or b"null")


def psql(db_url, sql):
    out = subprocess.run(["psql", db_url, "-Atc", sql], check=True, capture_output=True, text=True)
    return out.stdout.strip()


def sizes(db_url):
    rows = psql(db_url, """
        SELECT n.nspname || '.' || c.relname, pg_relation_size(c.oid),
               pg_indexes_size(c.oid), pg_total_relation_size(c.oid)
        FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
        WHERE c.relkind = 'r' AND n.nspname IN ('edge', 'inventory', 'payments', 'orders', 'pricing', 'catalog')
        ORDER BY 1""")
    out = {}
    for line in rows.splitlines():
        name, heap, idx, total = line.split("|")
        out[name] = (int(heap), int(idx), int(total))
    return out


def streams(monitor):
    with urllib.request.urlopen(f"http://127.0.0.1:{monitor}/jsz?accounts=true&streams=true") as r:
        jsz = json.load(r)
    out = {}
    for acct in jsz.get("account_details", []):
        for s in acct.get("stream_detail", []):
            out[s["name"]] = (s["state"]["bytes"], s["state"]["messages"])
    return out


def main():
    if not os.path.exists(BIN):
        subprocess.run(["cargo", "build", "--release", "--locked", "--quiet"], cwd=ROOT, check=True)
    nats_bin = NATS if os.path.exists(NATS) else shutil.which("nats-server")
    store = tempfile.mkdtemp(prefix="measure-nats-")
    client, monitor, http, psp_port = free_port(), free_port(), free_port(), free_port()
    db_name = f"checkout_measure_{os.getpid()}"
    db_url = f"{BASE_DB}/{db_name}"
    nats = subprocess.Popen([nats_bin, "-js", "-a", "127.0.0.1", "-p", str(client), "-m", str(monitor),
                             "-sd", store], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    secret = "measure-secret-of-at-least-32-bytes!!"
    env = dict(os.environ,
               CHECKOUT__NATS__URL=f"nats://127.0.0.1:{client}",
               CHECKOUT__DATABASE__URL=db_url,
               CHECKOUT__HTTP__ADDR=f"127.0.0.1:{http}",
               CHECKOUT__PSP__URL=f"http://127.0.0.1:{psp_port}",
               CHECKOUT__METRICS__ADDR="127.0.0.1:0",
               CHECKOUT__AUTH__JWT_SECRET=secret,
               CHECKOUT__PAYMENTS__TOKEN_KEYS="ab" * 32,
               CHECKOUT__PAYMENTS__RATE_LIMIT_PER_S="100000",
               CHECKOUT__EDGE__CHECKOUTS_PER_USER_PER_MIN="100000",
               CHECKOUT__EDGE__CHECKOUTS_PER_USER_BURST="100000",
               CHECKOUT__EDGE__REQUESTS_PER_USER_PER_S="100000",
               CHECKOUT__EDGE__REQUESTS_PER_USER_BURST="100000",
               RUST_LOG="error")
    psp = subprocess.Popen([PSP, "--listen", f"127.0.0.1:{psp_port}"], stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)
    app = subprocess.Popen([BIN, "run", "all"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{http}"
    try:
        for _ in range(300):
            try:
                if call("GET", f"{base}/readyz")[0] == 200:
                    break
            except Exception:
                time.sleep(0.1)
        token = lambda user, admin=False: subprocess.run(
            [BIN, "token", "--user", user] + (["--admin"] if admin else []),
            env=env, check=True, capture_output=True, text=True).stdout.strip()
        admin = token("admin", True)
        call("PUT", f"{base}/api/admin/products/TEE", admin,
             {"name": "Tee", "price": "12.50", "currency": "USD", "weightGrams": 200})
        call("PUT", f"{base}/api/admin/stock/TEE", admin, {"onHand": 1_000_000})
        buyers = [token(f"buyer-{i}") for i in range(BUYERS)]
        address = {"name": "Ada Lovelace", "line1": "1 Analytical St", "city": "London",
                   "postalCode": "N1 9GU", "country": "GB"}

        def place(count, offset):
            def buyer(i):
                for n in range(i, count, BUYERS):
                    _, cart = call("POST", f"{base}/api/cart/items", buyers[i], {"sku": "TEE", "qty": 1})
                    call("POST", f"{base}/api/checkout", buyers[i],
                         {"cartId": cart["cartId"], "paymentMethod": {"token": "tok_visa"}, "address": address},
                         {"Idempotency-Key": f"k-{offset + n}"})
            threads = [threading.Thread(target=buyer, args=(i,)) for i in range(BUYERS)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()

        def settled(total):
            for _ in range(1200):
                if int(psql(db_url, "SELECT count(*) FROM orders.orders")) >= total:
                    return
                time.sleep(0.1)
            sys.exit("orders did not settle")

        place(WARMUP, 0)
        settled(WARMUP)
        time.sleep(1)
        pg0, js0 = sizes(db_url), streams(monitor)
        started = time.time()
        place(ORDERS, WARMUP)
        settled(WARMUP + ORDERS)
        time.sleep(1)
        took = time.time() - started
        psql(db_url, "VACUUM ANALYZE")
        pg1, js1 = sizes(db_url), streams(monitor)
        print(f"{ORDERS} orders (after {WARMUP} warm-up), {ORDERS / took:.0f}/s; bytes per order:")
        print(f"{'table':34} {'heap':>8} {'indexes':>8} {'total':>8}")
        total = 0
        for name in sorted(pg1):
            h0, i0, t0 = pg0.get(name, (0, 0, 0))
            h1, i1, t1 = pg1[name]
            dt = (t1 - t0) / ORDERS
            total += dt
            if dt >= 1:
                print(f"{name:34} {(h1 - h0) / ORDERS:8.0f} {(i1 - i0) / ORDERS:8.0f} {dt:8.0f}")
        print(f"{'PostgreSQL, all tables':34} {'':8} {'':8} {total:8.0f}")
        for name in sorted(js1):
            b0, m0 = js0.get(name, (0, 0))
            b1, m1 = js1[name]
            print(f"stream {name:27} {(b1 - b0) / ORDERS:8.0f} bytes/order "
                  f"({(m1 - m0) / ORDERS:.1f} messages/order)")
    finally:
        app.send_signal(signal.SIGTERM)
        try:
            app.wait(timeout=20)
        except subprocess.TimeoutExpired:
            app.kill()
        psp.kill()
        nats.kill()
        shutil.rmtree(store, ignore_errors=True)
        subprocess.run(["psql", f"{BASE_DB}/postgres", "-qc",
                        f'DROP DATABASE IF EXISTS "{db_name}" WITH (FORCE)'], capture_output=True)


if __name__ == "__main__":
    main()
