#!/usr/bin/env python3
"""Latency timeline of 1-session smtp-source runs from a loopback pcap.

usage: smtp-timeline.py FILE.pcap SMTP_PORT GRPC_PORT PG_PORT [cycles-to-print]   (pip install dpkt)

Capture a 1-session smtp-source-bench.sh run (mailsuite up: SMTP 2525, store gRPC 50051,
PostgreSQL 55439) with
  tcpdump -i lo -s 200 -w run.pcap "tcp port 2525 or tcp port 50051 or tcp port 55439"
Every packet with payload is labelled (smtp>, smtp<, grpc>, grpc<, pg>, pg<: > = towards the
server); one cycle = from a SYN to the SMTP port to the next one. Prints the median gap before
each step of the most common step sequence.
"""
import collections
import statistics
import sys

import dpkt

path, smtp, grpc, pg = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
show = int(sys.argv[5]) if len(sys.argv) > 5 else 0
ports = {smtp: "smtp", grpc: "grpc", pg: "pg"}
cycles = []
cur = None
with open(path, "rb") as f:
    for ts, buf in dpkt.pcap.Reader(f):
        # Linux cooked or ethernet on lo
        try:
            eth = dpkt.ethernet.Ethernet(buf)
            ip = eth.data
        except Exception:
            continue
        if not isinstance(ip, dpkt.ip.IP) or not isinstance(ip.data, dpkt.tcp.TCP):
            continue
        tcp = ip.data
        if tcp.dport == smtp and tcp.flags & dpkt.tcp.TH_SYN and not tcp.flags & dpkt.tcp.TH_ACK:
            cur = []
            cycles.append(cur)
            cur.append((ts, "SYN", b""))
            continue
        if cur is None or not tcp.data:
            continue
        if tcp.dport in ports:
            label = ports[tcp.dport] + ">"
        elif tcp.sport in ports:
            label = ports[tcp.sport] + "<"
        else:
            continue
        head = bytes(tcp.data[:12])
        if label == "smtp>":
            w = head.split(b" ")[0].split(b"\r")[0][:6]
            label += w.decode("latin1") if w.isalpha() else "body"
        if label == "pg>" and head[:1].isalpha():
            label += chr(head[0])
        cur.append((ts, label, head))

seqs = collections.Counter(tuple(l for _, l, _ in c) for c in cycles[1:-1])
if not seqs:
    sys.exit("no cycles")
common, n = seqs.most_common(1)[0]
print(f"{len(cycles)} cycles, {n} with the most common sequence of {len(common)} steps; {len(seqs)} distinct sequences")
gaps = [[] for _ in common]
totals = []
for c in cycles[1:-1]:
    if tuple(l for _, l, _ in c) != common:
        continue
    for i in range(1, len(c)):
        gaps[i].append(c[i][0] - c[i - 1][0])
    totals.append(c[-1][0] - c[0][0])
starts = [c[0][0] for c in cycles]
period = statistics.median([b - a for a, b in zip(starts, starts[1:])])
print(f"median cycle (SYN to SYN): {period*1e3:.3f} ms; median SYN to last packet: {statistics.median(totals)*1e3:.3f} ms")
for i, l in enumerate(common):
    if i == 0:
        print(f"{'':>8}  {l}")
        continue
    g = statistics.median(gaps[i]) * 1e3
    print(f"{g:8.3f}  {l}")
for c in cycles[1:1 + show]:
    print("--")
    for i, (ts, l, h) in enumerate(c):
        print(f"{(ts - c[0][0])*1e3:8.3f} {l:10} {h!r}")
