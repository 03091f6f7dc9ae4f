#!/usr/bin/env python3
"""Prints oha's JSON summary (bench/run with RATE) in the lines of wrk's
output that bench/run reads: requests, req/s, p99, non-2xx, errors.

    oha_as_wrk.py OHA_JSON SECONDS
"""
import json
import sys

d = json.load(open(sys.argv[1]))
codes = d.get("statusCodeDistribution") or {}
ok = sum(n for code, n in codes.items() if code.startswith(("2", "3")))
# bench/run passes -w: requests in flight at the end are waited for, so
# every error here is a request that failed.
errors = sum((d.get("errorDistribution") or {}).values())
p = d.get("latencyPercentiles") or {}
print(f"  {sum(codes.values())} requests in {sys.argv[2]}s (oha, constant rate)")
print(f"Requests/sec: {d['summary']['requestsPerSec']:.2f}")
for name in ("p50", "p99", "p99.9"):
    if p.get(name) is not None:
        print(f"     {name[1:]}%   {p[name] * 1000:.3f}ms")
print(f"  Non-2xx or 3xx responses: {sum(codes.values()) - ok}")
print(f"  Socket errors: connect 0, read 0, write 0, timeout {errors}")
for what, n in (d.get("errorDistribution") or {}).items():
    print(f"  error: {n} x {what}")
