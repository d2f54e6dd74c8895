#!/usr/bin/env python3
"""Turn one bench/run.sh results dir into the tables of docs/PERFORMANCE.md.

Usage: bench/report.py RESULTS_DIR   (prints Markdown tables on stdout)

Reads RESULTS_DIR/runs.tsv (one line per fio run: job, format, server, status,
server CPU ticks sampled around the run, pids, fio JSON path), the fio JSON
files, and RESULTS_DIR/rss.tsv. Only the standard library; it reports, it does
not judge: targets from issue 10 are shown beside the ratios, nothing fails.
"""

import csv
import json
import os
import statistics
import sys

MIB = 1 << 20
GIB = 1 << 30

JOB_ORDER = [
    "randread-4k-qd1", "randread-4k-qd32", "randwrite-4k-qd1",
    "randwrite-4k-qd32", "read-1m-qd8", "write-1m-qd8", "randrw70-4k-qd32x4",
]
QD1 = {"randread-4k-qd1", "randwrite-4k-qd1"}


def load_run(results, row):
    """Metrics of one fio run, or None when it was not measured."""
    if row["status"] == "n/a" or not row["json"]:
        return None
    if row["status"].startswith(("fio-error", "server-died")):
        # Whatever JSON fio left is not a measurement.
        return {"status": row["status"], "broken": True}
    path = os.path.join(results, row["json"])
    try:
        with open(path) as f:
            text = f.read()
        # fio's nbd engine may print a line before the JSON on old versions.
        data = json.loads(text[text.index("{"):])
    except (OSError, ValueError):
        return {"status": row["status"], "broken": True}
    iops = bw = io_bytes = 0.0
    lat_sum = lat_n = 0.0
    p99 = 0.0
    for job in data.get("jobs", []):
        for d in ("read", "write"):
            s = job.get(d, {})
            n = s.get("total_ios", 0)
            if not n:
                continue
            iops += s.get("iops", 0.0)
            bw += s.get("bw_bytes", 0)
            io_bytes += s.get("io_bytes", 0)
            lat_sum += s.get("lat_ns", {}).get("mean", 0.0) * n
            lat_n += n
            pct = s.get("clat_ns", {}).get("percentile", {})
            p99 = max(p99, pct.get("99.000000", 0.0))
    cpu = None
    if row["cpu_ticks"] not in ("", None) and row["server"] != "io_uring" and io_bytes:
        cpu = int(row["cpu_ticks"]) / int(row["clk_tck"]) / (io_bytes / GIB)
    return {
        "status": row["status"],
        "iops": iops,
        "mibs": bw / MIB,
        "lat_us": (lat_sum / lat_n / 1000) if lat_n else None,
        "p99_us": p99 / 1000 if p99 else None,
        "cpu_s_per_gib": cpu,
        "broken": False,
    }


def combine(rs):
    """The median of each metric over the rounds, and the IOPS spread."""
    good = [r for r in rs if r and not r.get("na") and not r.get("broken")]
    if not good:
        bad = [r for r in rs if r and r.get("broken")]
        if bad:
            return bad[0]
        return rs[0] if rs else None
    out = {"broken": False, "n": len(good)}
    for m in ("iops", "mibs", "lat_us", "p99_us", "cpu_s_per_gib"):
        vals = [r[m] for r in good if r[m] is not None]
        out[m] = statistics.median(vals) if vals else None
    st = sorted({r["status"] for r in rs if r and "status" in r})
    out["status"] = ",".join(st) if st else "ok"
    iops = [r["iops"] for r in good]
    out["spread"] = (max(iops) - min(iops)) / out["iops"] * 100 if len(iops) > 1 and out["iops"] else None
    return out


def fmt_num(v, digits=0):
    if v is None:
        return "n/a"
    if digits == 0:
        return f"{v:,.0f}"
    return f"{v:,.{digits}f}"


def ratio(a, b):
    if not a or not b or a.get("broken") or b.get("broken"):
        return None
    if not b.get("iops"):
        return None
    return a["iops"] / b["iops"]


def fmt_ratio(r, target=None):
    if r is None:
        return "n/a"
    s = f"{r:.2f}x"
    if target is not None:
        s += " " + ("ok" if r >= target else "MISS")
    return s


def main():
    if len(sys.argv) != 2:
        sys.exit("usage: report.py RESULTS_DIR")
    results = sys.argv[1]
    samples = {}
    order = []
    with open(os.path.join(results, "runs.tsv")) as f:
        for row in csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE):
            key = (row["job"], row["format"], row["server"])
            if key not in samples:
                samples[key] = []
                order.append(key)
            if row["status"] == "n/a":
                samples[key].append({"na": row["json"] or "n/a"})
            else:
                samples[key].append(load_run(results, row))
    runs = {k: combine(v) for k, v in samples.items()}
    rounds = max((len(v) for v in samples.values()), default=1)
    jobs = [j for j in JOB_ORDER if any(k[0] == j for k in order)]

    def get(job, fmt, srv):
        r = runs.get((job, fmt, srv))
        if not r or r.get("na") or r.get("broken"):
            return None
        return r

    env = os.path.join(results, "env.txt")
    if os.path.exists(env):
        print("```")
        with open(env) as f:
            print(f.read().rstrip())
        print("```\n")

    if rounds > 1:
        print(f"Each cell is the median of {rounds} rounds; spread = (max - min) / median of IOPS.\n")
    print("## Per job (IOPS ratios: ours / peer on the same format; nbdkit is raw only)\n")
    print("| job | format | server | IOPS | spread % | MiB/s | mean lat us | p99 us | server CPU s/GiB | x qemu-nbd | x nbdkit | status |")
    print("|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    for job in jobs:
        for key in [k for k in order if k[0] == job]:
            _, fmt, srv = key
            r = runs.get(key)
            if r is None or r.get("na"):
                why = (r or {}).get("na", "n/a")
                print(f"| {job} | {fmt} | {srv} | n/a | | n/a | n/a | n/a | n/a | | | n/a: {why[:70]} |")
                continue
            if r.get("broken"):
                print(f"| {job} | {fmt} | {srv} | n/a | | n/a | n/a | n/a | n/a | | | {r['status']} |")
                continue
            xq = xk = ""
            if srv.startswith("ours"):
                xq = fmt_ratio(ratio(r, get(job, fmt, "qemu-nbd")))
                xk = fmt_ratio(ratio(r, get(job, "raw", "nbdkit"))) if fmt == "raw" else ""
            print(f"| {job} | {fmt} | {srv} | {fmt_num(r['iops'])} | {fmt_num(r['spread']) if r.get('spread') is not None else ''} | {fmt_num(r['mibs'], 1)} | "
                  f"{fmt_num(r['lat_us'], 1)} | {fmt_num(r['p99_us'], 1)} | "
                  f"{fmt_num(r['cpu_s_per_gib'], 2)} | {xq} | {xk} | {r['status']} |")
    print()

    print("## Ratios against the targets of issue 10 (IOPS; ok/MISS is informational)\n")
    print("| job | raw dom0 / best(qemu-nbd, nbdkit) >=1.0 | raw guest / raw dom0 >=0.8 (QD>=8) "
          "| raw guest / nbdkit >=0.9 (QD>=8) | guest QD1 added mean lat us <=60 "
          "| qcow2 dom0 / qemu-nbd >=1.0 | qcow2 dom0 / raw dom0 >=0.8 | vhd dom0 / qemu-nbd >=1.0 "
          "| raw dom0 / io_uring file | dom0 QD1 p99 us vs nbdkit |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for job in jobs:
        d0 = get(job, "raw", "ours-dom0")
        g = get(job, "raw", "ours-guest")
        q = get(job, "raw", "qemu-nbd")
        k = get(job, "raw", "nbdkit")
        u = get(job, "raw", "io_uring")
        best = max([p for p in (q, k) if p], key=lambda p: p["iops"], default=None)
        qd1 = job in QD1
        cells = [fmt_ratio(ratio(d0, best), 1.0)]
        cells.append("(QD1)" if qd1 else fmt_ratio(ratio(g, d0), 0.8))
        cells.append("(QD1)" if qd1 else fmt_ratio(ratio(g, k), 0.9))
        if qd1 and g and d0 and g["lat_us"] is not None and d0["lat_us"] is not None:
            added = g["lat_us"] - d0["lat_us"]
            cells.append(f"{added:.1f} " + ("ok" if added <= 60 else "MISS"))
        else:
            cells.append("")
        cells.append(fmt_ratio(ratio(get(job, "qcow2", "ours-dom0"), get(job, "qcow2", "qemu-nbd")), 1.0))
        cells.append(fmt_ratio(ratio(get(job, "qcow2", "ours-dom0"), d0), 0.8))
        cells.append(fmt_ratio(ratio(get(job, "vhd", "ours-dom0"), get(job, "vhd", "qemu-nbd")), 1.0))
        target = 0.8 if job == "read-1m-qd8" else None
        cells.append(fmt_ratio(ratio(d0, u), target))
        if qd1 and d0 and k and d0["p99_us"] and k["p99_us"]:
            ok = "ok" if d0["p99_us"] <= k["p99_us"] else "MISS"
            cells.append(f"{d0['p99_us']:.0f} vs {k['p99_us']:.0f} {ok}")
        else:
            cells.append("")
        print(f"| {job} | " + " | ".join(cells) + " |")
    print()

    rss = os.path.join(results, "rss.tsv")
    if os.path.exists(rss):
        print("## Memory (RSS summed over the server's processes; ours = daemon + worker)\n")
        print("| format | server | idle MiB | after the run MiB | peak (VmHWM sum) MiB | idle kB per process | state |")
        print("|---|---|---:|---:|---:|---|---|")
        with open(rss) as f:
            for row in csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE):
                def mib(v):
                    return f"{int(v) / 1024:.1f}" if v else "n/a"
                print(f"| {row['format']} | {row['server']} | {mib(row['idle_rss_kb'])} | "
                      f"{mib(row['end_rss_kb'])} | {mib(row['peak_rss_kb'])} | "
                      f"{row.get('idle_rss_kb_by_pid') or ''} | {row['state'][:60]} |")
        print()


if __name__ == "__main__":
    main()
