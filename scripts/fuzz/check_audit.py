"""Checks that every request the API fuzzing sent left exactly one audit row.

Usage: check_audit.py ROWS_CSV SKIP_PATHS HAR...

ROWS_CSV is `audit_actions` as CSV with a header (request_id, http_method,
endpoint, user_agent), read straight from the database after the server
stopped; endpoint is the path as it was sent (the column holds it decoded,
metadata.raw_endpoint the raw form when that differs). SKIP_PATHS is the server's NOX_AUDIT_SKIP_PATHS (comma-separated
exact paths that are never audited). Each HAR file is a schemathesis report
of one run: every request it sent and the response, whose X-Request-ID names
the audit row (the fuzzer sends no X-Request-ID of its own, so the server
generated every one).

The comparison is exact, both ways:
- a fuzzed request to a skipped path has no row; any other has exactly one,
  with its method and path;
- a row no fuzzed request explains must be one of this script's caller's
  own set-up requests (User-Agent nox-fuzz-setup/...) or one schemathesis
  made outside its test cases: loading /openapi.json and its start-up
  probe of the server (GET /schemathesis-probe...), both with its
  User-Agent. Anything else fails.
Exits 1 and lists the differences when anything is off.
"""

import collections
import csv
import json
import sys
import urllib.parse

SETUP_AGENT = "nox-fuzz-setup/"
FUZZER_AGENT = "schemathesis/"


def main() -> int:
    rows_csv, skip_paths, *hars = sys.argv[1:]
    skipped = {p.strip() for p in skip_paths.split(",") if p.strip()}

    rows = collections.defaultdict(list)
    with open(rows_csv, newline="") as f:
        for row in csv.DictReader(f):
            rows[row["request_id"]].append(row)
    total_rows = sum(len(r) for r in rows.values())

    problems = []
    sent = 0
    sent_skipped = 0
    explained = set()
    statuses = {}
    for har in hars:
        with open(har) as f:
            entries = json.load(f)["log"]["entries"]
        counts = collections.Counter()
        for entry in entries:
            sent += 1
            request, response = entry["request"], entry["response"]
            method = request["method"]
            path = urllib.parse.urlsplit(request["url"]).path
            counts[response.get("status", 0)] += 1
            ids = [
                h["value"]
                for h in response.get("headers", [])
                if h["name"].lower() == "x-request-id"
            ]
            if len(ids) != 1:
                problems.append(f"{method} {path}: response without one X-Request-ID ({ids})")
                continue
            request_id = ids[0].lower()
            explained.add(request_id)
            found = rows.get(request_id, [])
            if path in skipped:
                sent_skipped += 1
                if found:
                    problems.append(f"{method} {path} {request_id}: {len(found)} rows for a skipped path")
                continue
            if len(found) != 1:
                problems.append(f"{method} {path} {request_id}: {len(found)} audit rows, expected 1")
                continue
            row = found[0]
            if row["http_method"] != method or row["endpoint"] != path:
                problems.append(
                    f"{method} {path} {request_id}: the row says {row['http_method']} {row['endpoint']}"
                )
        statuses[har] = (len(entries), dict(sorted(counts.items())))

    setup = fuzzer_extra = 0
    for request_id, found in rows.items():
        if request_id in explained:
            continue
        for row in found:
            agent = row["user_agent"] or ""
            endpoint = row["endpoint"]
            if agent.startswith(SETUP_AGENT):
                setup += 1
            elif agent.startswith(FUZZER_AGENT) and (
                endpoint == "/openapi.json" or endpoint.startswith("/schemathesis-probe")
            ):
                fuzzer_extra += 1
            else:
                problems.append(
                    f"unexplained audit row {request_id}: {row['http_method']} {endpoint} ({agent!r})"
                )

    for har, (count, by_class) in statuses.items():
        print(f"  {har}: {count} requests, by status {by_class}")
    print(
        f"  fuzzed requests: {sent} ({sent_skipped} to never-audited paths {sorted(skipped)}); "
        f"audit rows: {total_rows} = {sent - sent_skipped} fuzzed + {setup} set-up "
        f"+ {fuzzer_extra} schema loads and probes"
        + ("" if not problems else " (NOT: see below)")
    )
    if problems:
        print(f"  {len(problems)} differences:")
        for line in problems[:50]:
            print("   ", line)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
