#!/usr/bin/env python3
"""check-manifest.py ROOT -- the claims packaging/kubernetes.yaml makes in its comments hold:
terminationGracePeriodSeconds > --shutdown-delay + --drain-timeout; the probes hit /readyz and
/livez on the port the image's ENTRYPOINT gives --health; --workers equals the CPU request;
resource requests are set. Prints PASS/FAIL lines (e2e.sh counts them)."""
import json
import re
import sys

import yaml

root = sys.argv[1]
ok = True


def check(name, cond, why=""):
    global ok
    print(("PASS " if cond else "FAIL ") + name + ("" if cond else f": {why}"))
    ok &= bool(cond)


def seconds(d):
    m = re.fullmatch(r"(\d+)(ms|s|m)", d)
    return int(m[1]) * {"ms": 0.001, "s": 1, "m": 60}[m[2]]


docs = list(yaml.safe_load_all(open(f"{root}/packaging/kubernetes.yaml")))
kinds = {d["kind"]: d for d in docs}
check("manifest: a Deployment and a Service", set(kinds) == {"Deployment", "Service"}, sorted(kinds))
pod = kinds["Deployment"]["spec"]["template"]["spec"]
c = pod["containers"][0]
args = c["args"]
opts = dict(a[2:].split("=", 1) for a in args[: args.index("--")] if "=" in a)
grace = pod["terminationGracePeriodSeconds"]
delay, drain = seconds(opts.get("shutdown-delay", "0s")), seconds(opts.get("drain-timeout", "30s"))
check(f"manifest: grace {grace}s > shutdown delay {delay}s + drain {drain}s", grace > delay + drain)

entry = None
for line in open(f"{root}/Dockerfile"):
    if line.startswith("ENTRYPOINT"):
        entry = json.loads(line[len("ENTRYPOINT"):])
health_port = int(entry[entry.index("--health") + 1].rsplit(":", 1)[1])
ports = {p["name"]: p["containerPort"] for p in c["ports"]}
for probe, path in (("readinessProbe", "/readyz"), ("livenessProbe", "/livez")):
    get = c[probe]["httpGet"]
    port = ports.get(get["port"], get["port"])
    check(f"manifest: {probe} GET {path} on the --health port {health_port}",
          get["path"] == path and port == health_port, get)
listen_port = int(entry[entry.index("--listen") + 1].rsplit(":", 1)[1])
check(f"manifest: containerPort http = --listen port {listen_port}", ports.get("http") == listen_port)
req = c["resources"]["requests"]
check("manifest: cpu and memory requests", "cpu" in req and "memory" in req, req)
check("manifest: --workers equals the cpu request", opts.get("workers") == str(req.get("cpu")), opts)
svc = kinds["Service"]["spec"]
labels = kinds["Deployment"]["spec"]["template"]["metadata"]["labels"]
check("manifest: Service selects the pods", svc["selector"].items() <= labels.items())
sys.exit(0 if ok else 1)
