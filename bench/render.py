#!/usr/bin/python3
"""Writes BENCHMARKS.md and bench/benchmarks.png from what bench/publish
measured (its directory, bench/published/ by default).

    bench/render.py [PUBLISHED_DIR]

Each phase directory is one bench/run (results.tsv, meta.sh, report.md);
live.txt is bench/propagation's output, callgrind.txt bench/callgrind's,
command.txt the exact command. Medians use the runs that went well and
were not disturbed by other work, as bench/run's own report does.
"""
import os
import re
import statistics
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PUB = sys.argv[1] if len(sys.argv) > 1 else os.path.join(ROOT, "bench", "published")
PROXIES = ["elb", "nginx", "haproxy"]
LABEL = {"elb": "ELB", "nginx": "nginx", "haproxy": "HAProxy"}
OTHERS_MAX = 10


def read_meta(phase):
    meta = {}
    path = os.path.join(PUB, phase, "meta.sh")
    if not os.path.exists(path):
        return meta
    for line in open(path):
        # declare -g NAME="value"  or  declare -g NAME=(...)
        if not line.startswith("declare -g "):
            continue
        name, _, value = line[len("declare -g "):].strip().partition("=")
        meta[name] = value.strip('"')
    return meta


def read_runs(phase):
    """{(proxy, workers, conns): [row, ...]} of the runs that went well."""
    runs = {}
    path = os.path.join(PUB, phase, "results.tsv")
    if not os.path.exists(path):
        return runs
    for line in open(path):
        f = line.split()
        if len(f) < 12 or f[8] != "ok":
            continue
        row = {
            "rps": float(f[4]),
            "p99": float(f[5]) if f[5] != "nan" else None,
            "cpu": float(f[9]) if f[9] != "nan" else None,
            "others": float(f[11]) if f[11] != "nan" else 100.0,
            "idle_rss": int(f[12]) if len(f) > 12 else None,
            "idle_pss": int(f[13]) if len(f) > 13 else None,
            "loaded_rss": int(f[14]) if len(f) > 14 else None,
        }
        runs.setdefault((f[1], int(f[2]), int(f[3])), []).append(row)
    return runs


def med(rows, key):
    clean = [r[key] for r in rows if r[key] is not None and r["others"] <= OTHERS_MAX]
    vals = clean or [r[key] for r in rows if r[key] is not None]
    return statistics.median(vals) if vals else None


def cells(runs):
    ws = sorted({k[1] for k in runs})
    cs = sorted({k[2] for k in runs})
    return [(w, c) for w in ws for c in cs]


def fmt(x, digits=0):
    return "–" if x is None else f"{x:,.{digits}f}"


def ratio(a, b):
    return None if a is None or b in (None, 0) else a / b


def throughput_table(runs):
    out = [
        "| workers | conns | ELB req/s | nginx req/s | HAProxy req/s | ELB/nginx | ELB/HAProxy "
        "| ELB p99 ms | nginx p99 ms | HAProxy p99 ms |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for w, c in cells(runs):
        rps = {p: med(runs.get((p, w, c), []), "rps") for p in PROXIES}
        p99 = {p: med(runs.get((p, w, c), []), "p99") for p in PROXIES}
        out.append(
            f"| {w} | {c:,} | {fmt(rps['elb'])} | {fmt(rps['nginx'])} | {fmt(rps['haproxy'])} "
            f"| {fmt(ratio(rps['elb'], rps['nginx']), 2)} | {fmt(ratio(rps['elb'], rps['haproxy']), 2)} "
            f"| {fmt(p99['elb'], 2)} | {fmt(p99['nginx'], 2)} | {fmt(p99['haproxy'], 2)} |"
        )
    return "\n".join(out)


def cpu_table(runs):
    out = [
        "| workers | conns | ELB µs/req | nginx µs/req | HAProxy µs/req | ELB/nginx | ELB/HAProxy |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for w, c in cells(runs):
        cpu = {p: med(runs.get((p, w, c), []), "cpu") for p in PROXIES}
        out.append(
            f"| {w} | {c:,} | {fmt(cpu['elb'], 2)} | {fmt(cpu['nginx'], 2)} | {fmt(cpu['haproxy'], 2)} "
            f"| {fmt(ratio(cpu['elb'], cpu['nginx']), 2)} | {fmt(ratio(cpu['elb'], cpu['haproxy']), 2)} |"
        )
    return "\n".join(out)


def memory_table(runs):
    out = [
        "| workers | ELB idle PSS | nginx idle PSS | HAProxy idle PSS | ELB idle RSS | nginx idle RSS "
        "| HAProxy idle RSS | ELB RSS after 1,024 conns | nginx RSS after | HAProxy RSS after |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for w in sorted({k[1] for k in runs}):
        rows = {p: [r for (q, ww, _), rs in runs.items() if q == p and ww == w for r in rs] for p in PROXIES}
        loaded = {p: med(runs.get((p, w, 1024), []), "loaded_rss") for p in PROXIES}
        mib = {k: (lambda v: None if v is None else v / 1024) for k in PROXIES}
        cells_ = [mib[p](med(rows[p], "idle_pss")) for p in PROXIES]
        cells_ += [mib[p](med(rows[p], "idle_rss")) for p in PROXIES]
        cells_ += [mib[p](loaded[p]) for p in PROXIES]
        out.append(f"| {w} | " + " | ".join(fmt(x, 1) for x in cells_) + " |")
    return "\n".join(out)


def rate_table(runs, rate):
    out = [
        "| proxy | workers | conns | offered req/s | served req/s | p99 ms | µs/req |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for (p, w, c), rows in sorted(runs.items(), key=lambda kv: PROXIES.index(kv[0][0])):
        out.append(
            f"| {LABEL[p]} | {w} | {c:,} | {rate} | {fmt(med(rows, 'rps'))} "
            f"| {fmt(med(rows, 'p99'), 2)} | {fmt(med(rows, 'cpu'), 2)} |"
        )
    return "\n".join(out)


def chart(phases, path):
    fig, axes = plt.subplots(1, len(phases), figsize=(6.5 * len(phases), 4.2), squeeze=False)
    colours = {"elb": "#c0392b", "nginx": "#27ae60", "haproxy": "#2c6fbb"}
    for ax, (title, runs) in zip(axes[0], phases):
        cs = cells(runs)
        width = 0.27
        for i, p in enumerate(PROXIES):
            ys = [(med(runs.get((p, w, c), []), "rps") or 0) / 1000 for w, c in cs]
            ax.bar([x + (i - 1) * width for x in range(len(cs))], ys, width, label=LABEL[p], color=colours[p])
        ax.set_xticks(range(len(cs)))
        ax.set_xticklabels([f"{w}w\n{c}c" for w, c in cs], fontsize=8)
        ax.set_ylabel("thousand requests/s (median)")
        ax.set_title(title)
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def number_after(t, pattern):
    """The first number in text t after regex pattern, or None."""
    m = re.search(pattern + r"\s*([0-9.]+)", t or "")
    return float(m.group(1)) if m else None


def goals(keep, close, rate_runs, rate_meta):
    """(goal, measured, met) rows; the cells of 1-2 workers decide."""
    rows = []
    small = [(w, c) for w, c in cells(keep) if w <= 2]

    def worst(runs, fn):
        vals = [fn(runs, w, c) for w, c in small]
        vals = [v for v in vals if v is not None]
        return (min(vals), max(vals)) if vals else (None, None)

    r = lambda a, b, key: (lambda runs, w, c: ratio(med(runs.get((a, w, c), []), key), med(runs.get((b, w, c), []), key)))
    lo, hi = worst(keep, r("elb", "nginx", "rps"))
    rows.append(("req/s ≥ 1.3× nginx, every cell of 1–2 workers", f"{fmt(lo, 2)}–{fmt(hi, 2)}×", lo is not None and lo >= 1.3))
    lo, hi = worst(keep, r("elb", "haproxy", "rps"))
    rows.append(("req/s ≥ 1.15× HAProxy, every cell of 1–2 workers", f"{fmt(lo, 2)}–{fmt(hi, 2)}×", lo is not None and lo >= 1.15))
    lo, hi = worst(keep, r("elb", "nginx", "cpu"))
    rows.append(("CPU per request ≤ 0.7× nginx's", f"{fmt(lo, 2)}–{fmt(hi, 2)}×", hi is not None and hi <= 0.7))
    lo, hi = worst(keep, r("elb", "nginx", "p99"))
    rows.append(("p99 ≤ nginx's (keep-alive, as fast as it goes)", f"{fmt(lo, 2)}–{fmt(hi, 2)}× nginx's", hi is not None and hi <= 1.0))
    if rate_runs:
        e = med(next((v for k, v in rate_runs.items() if k[0] == "elb"), []), "p99")
        n = med(next((v for k, v in rate_runs.items() if k[0] == "nginx"), []), "p99")
        rows.append((f"p99 ≤ nginx's at a constant {rate_meta.get('RATE', '?')} req/s", f"{fmt(e, 2)} ms vs {fmt(n, 2)} ms", None not in (e, n) and e <= n))
    if close:
        small_c = [(w, c) for w, c in cells(close) if w <= 2]
        vals = [ratio(med(close.get(("elb", w, c), []), "rps"), med(close.get(("nginx", w, c), []), "rps")) for w, c in small_c]
        vals = [v for v in vals if v is not None]
        if vals:
            rows.append(("`Connection: close` req/s ≥ 1.1× nginx", f"{min(vals):.2f}–{max(vals):.2f}×", min(vals) >= 1.1))
    cg = text("callgrind.txt")
    e, n = number_after(cg, r"elb"), number_after(cg, r"nginx")
    if e and n:
        rows.append(("callgrind instructions per request ≤ 0.7× nginx's", f"{e:,.0f} vs {n:,.0f}: {e / n:.2f}×", e / n <= 0.7))
    idle = [r for (p, w, _), rs in keep.items() if p == "elb" and w == 2 for r in rs]
    pss, rss = med(idle, "idle_pss"), med(idle, "idle_rss")
    if pss and rss:
        rows.append(("idle memory of master + 2 workers < 16 MB", f"PSS {pss / 1024:.1f} MiB (RSS summed {rss / 1024:.1f} MiB)", pss / 1024 < 16))
    live = text("live.txt")
    quiet = number_after(live, r"no update:")
    busy = number_after(live, r"updates \(\d+/s\):")
    failed = re.search(r"updates \(.*?(\d+) failed", live or "")
    own = number_after(live, r"with \(")
    if quiet and busy and failed:
        share = busy / quiet
        own_text = f"; ELB's workers' CPU per request {own:.3f}× the run without" if own else ""
        rows.append((
            "100 etcd updates/s at full load: no failed request, throughput within 5 %",
            f"{failed.group(1)} failed, throughput {share:.4f} of the run without{own_text}",
            int(failed.group(1)) == 0 and share >= 0.95,
        ))
    return rows


def misses(keep):
    """What the perf profile says about the CPU-per-request goal."""
    perf = text("perf.txt")
    ek, nk = number_after(perf, r"\nelb"), number_after(perf, r"\nnginx")
    e = med(keep.get(("elb", 2, 256), []), "cpu")
    n = med(keep.get(("nginx", 2, 256), []), "cpu")
    if None in (ek, nk, e, n):
        return []
    floor = e * ek / 100 / n
    return [
        "## Reading the goals",
        "",
        f"At 2 workers and 256 connections ELB's processes spent {e:.1f} µs of CPU per request and "
        f"nginx's {n:.1f} µs. The profile below puts {ek:.0f} % of ELB's workers' time in the kernel "
        f"(nginx: {nk:.0f} %): the TCP stack, loopback and connection tracking, which is the same work "
        "per request for every proxy that makes the same system calls. ELB's own code is the rest, and "
        f"callgrind counts it at about two thirds of nginx's instructions. Even with none of it, ELB would "
        f"use {floor:.2f}× nginx's CPU per request, so a CPU or throughput goal past that cannot be met by "
        "ELB's code alone: it takes fewer or cheaper system calls per request. Throughput on this machine "
        "also follows how the scheduler shares two cores between wrk, two backends and the proxy, which "
        "is why req/s ratios move more than CPU ratios between cells and runs.",
        "",
    ]


def text(name):
    path = os.path.join(PUB, name)
    return open(path).read().strip() if os.path.exists(path) else None


def main():
    keep, close, rate = read_runs("keepalive"), read_runs("close"), read_runs("rate")
    meta, rate_meta = read_meta("keepalive"), read_meta("rate")
    if not keep:
        sys.exit(f"render.py: no keep-alive results in {PUB}/keepalive (run bench/publish)")
    phases = [("keep-alive", keep)] + ([("Connection: close", close)] if close else [])
    chart(phases, os.path.join(ROOT, "bench", "benchmarks.png"))

    md = ["# Benchmarks", ""]
    md += [
        "ELB against nginx and HAProxy on one machine, in one run, each proxy in front of the same two "
        "nginx backends (64-byte answers). Everything here comes from one command, and an operator can "
        "run it on their own machine:",
        "",
        "```sh",
        text("command.txt") or "bench/publish",
        "```",
        "",
        "[bench/README.md](bench/README.md) says what each run does and how it keeps other work on the "
        "machine out of the figures. Timings are never part of the tests.",
        "",
    ]
    header = text("machine.txt")
    if header:
        md += [header, ""]
    md += ["## Goals", "", "| goal | measured | met |", "|---|---|---|"]
    for goal, measured, met in goals(keep, close, rate, rate_meta):
        md.append(f"| {goal} | {measured} | {'yes' if met else '**no**'} |")
    md += ["", "![Requests per second by workers and connections](bench/benchmarks.png)", ""]
    md += misses(keep)
    md += ["## Keep-alive clients", "", throughput_table(keep), "", "CPU the proxy's own processes used per request:", "", cpu_table(keep), ""]
    if close:
        others, calm = (
            [float(f[11]) for f in map(str.split, open(os.path.join(PUB, phase, "results.tsv")))
             if len(f) > 11 and f[11] != "nan"]
            for phase in ("close", "keepalive")
        )
        md += ["## A new connection per request (`Connection: close`)", ""]
        if others and min(others) > OTHERS_MAX:
            md += [
                f"In every one of these runs, for all three proxies alike, {min(others):.0f}–{max(others):.0f} % of "
                "the machine's CPU time went to something other than wrk, the backends and the proxy, against "
                f"at most {max(calm, default=0):.0f} % with keep-alive clients, so bench/run measured each twice and the medians are over all "
                "runs. The kernel's own threads take under 2 % of it; where the rest is charged is not known.",
                "",
            ]
        md += [throughput_table(close), "", cpu_table(close), ""]
    if rate:
        md += [
            "## Latency at a constant rate",
            "",
            f"oha offers {rate_meta.get('RATE', '?')} requests a second (half of nginx's peak at 2 workers "
            "and 256 connections in the keep-alive run) and measures each request from when it was due, "
            "so a stall counts in full.",
            "",
            rate_table(rate, rate_meta.get("RATE", "?")),
            "",
        ]
    md += [
        "## Memory",
        "",
        "MiB, medians over the runs. PSS divides each shared page among the processes that map it, "
        "so its sum is what the proxy costs the machine; RSS counts ELB's shared region once per "
        "process. Idle: started, configured, one check request served.",
        "",
        memory_table(keep),
        "",
    ]
    for title, name in [
        ("Live change under load", "live.txt"),
        ("Instructions per request (callgrind)", "callgrind.txt"),
        ("Where the time goes (perf, ELB's workers)", "perf.txt"),
    ]:
        t = text(name)
        if t:
            md += [f"## {title}", "", "```", t, "```", ""]
    md += ["## Every run", ""]
    for title, phase in [("keep-alive", "keepalive"), ("Connection: close", "close"), ("constant rate", "rate")]:
        s = text(os.path.join(phase, "report.md"))
        if s:
            md += [f"<details><summary>bench/run report: {title}</summary>", "", s.replace("# ELB vs nginx vs HAProxy", "").strip(), "", "</details>", ""]
    open(os.path.join(ROOT, "BENCHMARKS.md"), "w").write("\n".join(md))
    print("wrote BENCHMARKS.md and bench/benchmarks.png")


main()
