"""How soon a committed audit record reaches a live stream (bench-stream.sh).

A user of its own makes a request every 100 ms; a stream filtered to that
user receives each record. In durable mode a response follows its row's
commit, so the time from a response to its record's event bounds the
stream's delay after the commit from above.

    python3 stream_latency.py BASE_URL ADMIN_TOKEN SECONDS
"""

import json
import sys
import threading
import time
import urllib.request

base, admin, seconds = sys.argv[1], sys.argv[2], float(sys.argv[3])


def call(method, path, token, body=None):
    request = urllib.request.Request(base + path, method=method, data=body)
    request.add_header("Authorization", "Bearer " + token)
    if body is not None:
        request.add_header("Content-Type", "application/json")
    return urllib.request.urlopen(request, timeout=30)


user = json.load(call("POST", "/admin/users", admin, json.dumps({"name": f"probe-{time.time_ns()}"}).encode()))
answered, arrived = {}, {}
stream = call("GET", f"/admin/audit/stream?user_id={user['id']}", admin)


def read_events():
    for line in stream:
        if line.startswith(b"data: "):
            record = json.loads(line[6:])
            arrived.setdefault(record["request_id"], time.monotonic())


threading.Thread(target=read_events, daemon=True).start()
end = time.monotonic() + seconds
while time.monotonic() < end:
    response = call("GET", "/me", user["token"])
    response.read()
    answered[response.headers["X-Request-ID"]] = time.monotonic()
    time.sleep(0.1)
time.sleep(2)  # the last events
delays = sorted((arrived[r] - t) * 1000 for r, t in answered.items() if r in arrived)
missing = len(answered) - len(delays)
if not delays:
    print(f"stream delay: no record arrived ({len(answered)} requests)")
else:
    pick = lambda q: delays[min(len(delays) - 1, int(q * len(delays)))]
    print(
        f"stream delay after the response: n {len(delays)}, p50 {pick(0.5):.1f} ms, "
        f"p99 {pick(0.99):.1f} ms, max {delays[-1]:.1f} ms, missing {missing}"
    )
