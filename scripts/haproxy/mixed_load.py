"""A short mixed load through the balancer, for scripts/haproxy-smoke.sh.

Usage: mixed_load.py BASE ADMIN_TOKEN SECONDS CONCURRENCY OUT

Each worker is a user of its own doing, for SECONDS: write a file, read it
back, list, run a command (when runs are available), and now and then an
admin search of the audit trail. Every answer must be a success; a file
written through one server must read back the same through the next (the
servers share NOX_SANDBOX_DIR). Writes the X-Request-ID of every response,
one per line, to OUT (the script checks each has exactly one audit row) and
prints a summary line. Exits 1 on any failure.
"""

import json
import os
import sys
import threading
import time
import urllib.error
import urllib.request

BASE, ADMIN, SECONDS, CONCURRENCY, OUT = (
    sys.argv[1],
    sys.argv[2],
    float(sys.argv[3]),
    int(sys.argv[4]),
    sys.argv[5],
)

lock = threading.Lock()
request_ids = []
failures = []
counts = {}


def call(method, path, token, body=None, expect=(200, 201)):
    request = urllib.request.Request(BASE + path, data=body, method=method)
    request.add_header("Authorization", "Bearer " + token)
    if body is not None and path.startswith(("/run", "/admin/users")):
        request.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            status, data, rid = response.status, response.read(), response.headers["X-Request-ID"]
    except urllib.error.HTTPError as error:
        status, data, rid = error.code, error.read(), error.headers.get("X-Request-ID")
    with lock:
        if rid:
            request_ids.append(rid)
        counts[path.split("?")[0]] = counts.get(path.split("?")[0], 0) + 1
        if status not in expect:
            failures.append(f"{method} {path}: {status} {data[:200]!r}")
    return status, data


def new_user(name):
    _, data = call("POST", "/admin/users", ADMIN, json.dumps({"name": name, "tier": "unlimited"}).encode())
    return json.loads(data)["token"]


def runs_available():
    with urllib.request.urlopen(BASE + "/health", timeout=10) as response:
        return json.load(response)["sandbox"]["status"] == "ready"


def worker(index, runs):
    token = new_user(f"load-{os.getpid()}-{index}")
    deadline = time.monotonic() + SECONDS
    round_ = 0
    while time.monotonic() < deadline:
        content = f"worker {index} round {round_}\n".encode()
        call("PUT", f"/write?path=f{round_ % 5}.txt", token, content)
        # The next request goes to the next server (round robin).
        _, read = call("GET", f"/cat?path=f{round_ % 5}.txt", token)
        if json.loads(read).get("content", "").encode() != content:
            with lock:
                failures.append(f"worker {index}: read {read[:80]!r}, wrote {content!r}")
        call("GET", "/ls?path=.", token)
        call("GET", "/me", token)
        if runs:
            call("POST", "/run", token, json.dumps({"command": "cat f0.txt | wc -c"}).encode())
        if round_ % 5 == 0:
            call("GET", "/admin/audit/logs?page_size=20", ADMIN)
        round_ += 1


def main():
    runs = runs_available()
    threads = [threading.Thread(target=worker, args=(i, runs)) for i in range(CONCURRENCY)]
    started = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.monotonic() - started
    with open(OUT, "w") as out:
        out.write("\n".join(request_ids) + "\n")
    total = sum(counts.values())
    print(
        f"mixed load: {total} requests in {elapsed:.1f} s ({total / elapsed:.0f} req/s), "
        f"{len(failures)} failures, runs {'on' if runs else 'off (sandbox unavailable)'}; "
        + ", ".join(f"{path} {n}" for path, n in sorted(counts.items()))
    )
    for failure in failures[:20]:
        print("  FAILED", failure)
    sys.exit(1 if failures else 0)


main()
