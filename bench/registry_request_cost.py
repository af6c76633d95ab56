#!/usr/bin/env python3
"""CPU a registry spends per range request (docs/BENCHMARKS.md, issue 7).

usage: registry_request_cost.py <registry pid> <host:port> <repo> <digest> [n] [sizes...]

Makes n range GETs of each size (random offsets in the first 3 MB of the
blob, one keep-alive connection) and prints the registry's CPU time
(/proc/<pid>/stat, user + system) per request.
"""
import http.client
import os
import random
import sys
import time


def cpu(pid):
    f = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")


def main():
    if len(sys.argv) < 5:
        sys.exit(__doc__)
    pid, hostport, repo, digest = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
    n = int(sys.argv[5]) if len(sys.argv) > 5 else 300
    sizes = [int(s) for s in sys.argv[6:]] or [8192, 65536, 1 << 20]
    host, port = hostport.rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port))
    for size in sizes:
        c0, t0 = cpu(pid), time.time()
        for _ in range(n):
            off = random.randrange(0, 3_000_000)
            conn.request("GET", f"/v2/{repo}/blobs/{digest}",
                         headers={"Range": f"bytes={off}-{off + size - 1}"})
            r = conn.getresponse()
            r.read()
            if r.status not in (200, 206):
                sys.exit(f"HTTP {r.status}")
        used = cpu(pid) - c0
        print(f"{size:>8} B x {n}: wall {time.time() - t0:.3f} s, registry CPU "
              f"{used:.3f} s, {used / n * 1000:.2f} ms per request")


if __name__ == "__main__":
    main()
