"""Benchmark qabel_rest against a bare stdlib server doing the same work, in one run.

    python bench.py                  # 3.7 KB synced document, then a 1 MB one
    python bench.py --duration 3 --rounds 3 --connections 8 --client python

The baseline ("bare") is a ThreadingHTTPServer with HTTP/1.1 keep-alive and
TCP_NODELAY that serves cached JSON bytes and stores PUTs in memory under a lock: no
auth, no validation, no disk. qabel_rest runs as its own process with a temp data dir
and fsyncs every PUT before answering. Both get the same document and the same
requests, and both answer GET /synced with the same bytes (checked). Load comes from
wrk (Debian package `wrk`) when installed, else from a built-in multi-threaded
keep-alive client. Absolute numbers drift from run to run; the ratios of one run hold.
"""

import argparse
import json
import os
import re
import shutil
import statistics
import socket
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
KEY = "bench-key-0123456789abcdef0123456789abcdef"


def sample_synced(n_identities=4):
    """A realistic synced document (the one of shared/bench/sample_docs.py)."""
    key = "A" * 64
    stamp = {"updated": 1700000000, "created": 1700000000, "deleted": 0}
    return {
        "accounts": [{"id": 1, **stamp, "provider": "qabel.de", "user": "alice",
                      "auth": "tok-" + "x" * 30}],
        "drop_servers": [{"id": i, **stamp, "url": f"https://drop{i}.qabel.de/", "auth": "",
                          "active": True} for i in range(2)],
        "storage_servers": [{"id": 1, **stamp, "url": "https://storage.qabel.de/", "auth": ""}],
        "storage_volumes": [{"id": 1, **stamp, "storage_server_id": 1,
                             "public_identifier": "vol-1", "token": "t" * 32,
                             "revoke_token": "r" * 32}],
        "identities": [{"id": i, **stamp, "alias": f"alice-{i}",
                        "keys": {k: key for k in (
                            "private_primary_key", "public_primary_key", "private_enc_key",
                            "public_enc_key", "private_sign_key", "public_sign_key")},
                        "drops": [f"https://drop0.qabel.de/{'d' * 43}"]}
                       for i in range(n_identities)],
        "module_data": {},
    }


def dump(document):
    return json.dumps(document, ensure_ascii=False, separators=(",", ":")).encode()


# ---------------------------------------------------------------------------
# The bare baseline server (run as: python bench.py --bare PORT DOCFILE)
# ---------------------------------------------------------------------------

def run_bare(port, doc_file):
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    with open(doc_file, "rb") as f:
        doc = json.loads(f.read())
    lock = threading.Lock()
    body = [dump(doc)]

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        disable_nagle_algorithm = True

        def log_message(self, *args):
            pass

        def _send(self, code, data):
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self):
            self._send(200, body[0])

        def do_PUT(self):
            length = int(self.headers.get("Content-Length", 0))
            request = json.loads(self.rfile.read(length))
            with lock:
                doc["module_data"][request["key"]] = request["value"]
                body[0] = dump(doc)
            self._send(200, b'{"ok":true}')

    ThreadingHTTPServer.daemon_threads = True
    server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    print(f"bare listening on {server.server_address[1]}", flush=True)
    server.serve_forever()


# ---------------------------------------------------------------------------
# Servers and clients
# ---------------------------------------------------------------------------

def start(args, pattern):
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            cwd=HERE)
    line = proc.stdout.readline().decode()
    match = re.search(pattern, line)
    if not match:
        proc.kill()
        raise SystemExit(f"server did not start: {line!r}")
    return proc, int(match.group(1))


def http_get(port, path):
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: localhost\r\nX-API-Key: {KEY}\r\n"
                     "Connection: close\r\n\r\n".encode())
        data = b""
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


WRK_PUT = """
counter = 0
request = function()
  counter = counter + 1
  local body = '{"key":"module_data.bench","value":{"n":' .. counter .. '}}'
  return wrk.format("PUT", "/synced", {["Content-Type"]="application/json",
                    ["X-API-Key"]="%s", ["Host"]="localhost"}, body)
end
""" % KEY
WRK_GET = """
wrk.headers["X-API-Key"] = "%s"
wrk.headers["Host"] = "localhost"
""" % KEY


def load_wrk(port, method, seconds, connections, scratch):
    script = os.path.join(scratch, f"{method}.lua")
    with open(script, "w") as f:
        f.write(WRK_PUT if method == "PUT" else WRK_GET)
    out = subprocess.run(["wrk", "-t1", f"-c{connections}", f"-d{seconds:g}s", "-s", script,
                          f"http://127.0.0.1:{port}/synced"],
                         capture_output=True, text=True, check=True).stdout
    rate = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    bad = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    errors = re.search(r"Socket errors:.*", out)
    if bad or errors:
        raise SystemExit(f"wrk saw failures:\n{out}")
    return rate


def load_python(port, method, seconds, connections, scratch):
    """A keep-alive client per thread; counts answered requests (every one a 200)."""
    counts = [0] * connections
    failures = []
    deadline = time.monotonic() + seconds

    def worker(index):
        sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, True)
        reader = sock.makefile("rb")
        n = 0
        while time.monotonic() < deadline:
            n += 1
            if method == "PUT":
                body = b'{"key":"module_data.bench","value":{"n":%d}}' % n
                request = (b"PUT /synced HTTP/1.1\r\nHost: localhost\r\nX-API-Key: %s\r\n"
                           b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
                           % (KEY.encode(), len(body), body))
            else:
                request = (b"GET /synced HTTP/1.1\r\nHost: localhost\r\nX-API-Key: %s\r\n\r\n"
                           % KEY.encode())
            sock.sendall(request)
            status = reader.readline()
            length = 0
            while True:
                line = reader.readline()
                if line in (b"\r\n", b""):
                    break
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":")[1])
            reader.read(length)
            if b" 200 " not in status:
                failures.append(status)
                break
            counts[index] += 1
        sock.close()

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(connections)]
    started = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if failures:
        raise SystemExit(f"failed responses: {failures[:3]}")
    return sum(counts) / (time.monotonic() - started)


def rss_kb(pid):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        return None


def import_cost(repeat=30):
    """Median wall time of `python -c "import qabel_rest"` minus `python -c pass`, ms.

    Bytecode is compiled first, as a user's Python caches it."""
    import py_compile
    py_compile.compile(os.path.join(HERE, "qabel_rest.py"), doraise=True)
    env = dict(os.environ)
    env.pop("PYTHONDONTWRITEBYTECODE", None)

    def median(code):
        times = []
        for _ in range(repeat):
            started = time.perf_counter()
            subprocess.run([sys.executable, "-c", code], cwd=HERE, env=env, check=True)
            times.append(time.perf_counter() - started)
        return statistics.median(times) * 1000

    bare, module = median("pass"), median("import qabel_rest")
    return module - bare


# ---------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------

def scenario(name, document, args, load, scratch, rows):
    data_dir = os.path.join(scratch, name)
    os.mkdir(data_dir)
    doc_file = os.path.join(data_dir, "synced.json")
    with open(doc_file, "wb") as f:
        f.write(dump(document))
    bare, bare_port = start([sys.executable, __file__, "--bare", "0", doc_file],
                            r"bare listening on (\d+)")
    qabel, qabel_port = start([sys.executable, os.path.join(HERE, "qabel_rest.py"),
                               "--port", "0", "--data-dir", data_dir, "--api-key", KEY,
                               "--max-body", str(4 << 20)],
                              r"listening on http://[^:]+:(\d+)")
    ready_rss = rss_kb(qabel.pid)
    try:
        same = http_get(bare_port, "/synced") == http_get(qabel_port, "/synced")
        print(f"{name}: {len(dump(document)):,} bytes, same GET bytes from both: {same}",
              flush=True)
        if not same:
            raise SystemExit("the two servers do not serve the same bytes")
        for method in ("GET", "PUT"):
            # Alternate the two servers and take each one's median: the machine's
            # speed drifts, and a drift then hits both alike.
            runs = {"bare": [], "qabel_rest": []}
            for _ in range(args.rounds):
                for server, port in (("bare", bare_port), ("qabel_rest", qabel_port)):
                    runs[server].append(load(port, method, args.duration, args.connections,
                                             scratch))
            figures = {server: statistics.median(rates) for server, rates in runs.items()}
            ratio = figures["qabel_rest"] / figures["bare"]
            rows.append((name, method, figures["bare"], figures["qabel_rest"], ratio))
            print(f"  {method:4s} bare {figures['bare']:8,.0f} req/s   qabel_rest "
                  f"{figures['qabel_rest']:8,.0f} req/s   ratio {ratio:.2f}", flush=True)
        return ready_rss, rss_kb(qabel.pid)
    finally:
        for proc in (bare, qabel):
            proc.terminate()
            proc.wait(10)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=3, help="seconds per measurement")
    parser.add_argument("--rounds", type=int, default=3,
                        help="measurements per server and request, alternating; the "
                             "median counts")
    parser.add_argument("--connections", type=int, default=8)
    parser.add_argument("--client", choices=("auto", "wrk", "python"), default="auto")
    parser.add_argument("--bare", nargs=2, metavar=("PORT", "DOCFILE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.bare:
        run_bare(int(args.bare[0]), args.bare[1])
        return
    use_wrk = args.client == "wrk" or args.client == "auto" and shutil.which("wrk")
    load = load_wrk if use_wrk else load_python
    client = "wrk -t1" if use_wrk else "built-in python client"
    print(f"client: {client}, {args.connections} connections, median of {args.rounds} "
          f"alternating runs of {args.duration:g} s, "
          f"{os.cpu_count()} cores, Python {sys.version.split()[0]}", flush=True)

    # the footprint of a ready server with the small document
    scratch = tempfile.mkdtemp(prefix="qabel-bench-")
    rows = []
    try:
        small_rss = scenario("3.7KB", sample_synced(4), args, load, scratch, rows)
        n = 1
        while len(dump(sample_synced(n))) < 1 << 20:
            n *= 2
        while len(dump(sample_synced(n - 16))) >= 1 << 20:
            n -= 16
        scenario("1MB", sample_synced(n), args, load, scratch, rows)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    cost = import_cost()
    print()
    print("| document | request | bare stdlib | qabel_rest | ratio |")
    print("|---|---|---|---|---|")
    for name, method, bare, qabel, ratio in rows:
        what = "GET /synced" if method == "GET" else "PUT one key (fsync'd)"
        print(f"| {name} | {what} | {bare:,.0f} req/s | {qabel:,.0f} req/s | {ratio:.2f} |")
    print()
    print(f"import qabel_rest: +{cost:.1f} ms over `python -c pass` (median of 30)")
    if small_rss[0]:
        print(f"RSS of qabel_rest with the 3.7KB document: {small_rss[0] / 1024:.1f} MB "
              f"when ready, {small_rss[1] / 1024:.1f} MB after the load")


if __name__ == "__main__":
    main()
