#!/usr/bin/env python3
"""Time from process start to systemd's READY=1 for a command, as systemd would see it.

Usage: ready-time.py [--log FILE] -- COMMAND...
Binds a datagram socket, starts COMMAND with NOTIFY_SOCKET pointing at it, waits for READY=1
(at most 600 s), sends SIGTERM, waits for a clean exit, and prints one JSON line:
{"ready_ms": ..., "status": "<last STATUS= text>", "exit": <code>}. Exit 1 when READY never came
or the command did not stop cleanly.
"""
import json, os, signal, socket, subprocess, sys, tempfile, time

args = sys.argv[1:]
log = subprocess.DEVNULL
if args[:1] == ["--log"]:
    log = open(args[1], "wb")
    args = args[2:]
if args[:1] == ["--"]:
    args = args[1:]
d = tempfile.mkdtemp()
path = os.path.join(d, "notify")
s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
s.bind(path)
s.settimeout(1.0)
t0 = time.monotonic()
p = subprocess.Popen(args, env=dict(os.environ, NOTIFY_SOCKET=path), stdout=log, stderr=log)
ready, status = None, ""
while ready is None or not status or status.startswith(("SELFTEST", "BOOTING")):
    if time.monotonic() - t0 > 600 or (p.poll() is not None and ready is None):
        break
    try:
        msg = s.recv(4096).decode(errors="replace")
    except socket.timeout:
        if ready is not None:
            break
        continue
    for line in msg.splitlines():
        if line == "READY=1" and ready is None:
            ready = time.monotonic() - t0
        elif line.startswith("STATUS="):
            status = line[len("STATUS="):]
if p.poll() is None:
    p.send_signal(signal.SIGTERM)
try:
    code = p.wait(timeout=120)
except subprocess.TimeoutExpired:
    p.kill()
    code = None
print(json.dumps({"ready_ms": None if ready is None else round(ready * 1000), "status": status, "exit": code}))
sys.exit(0 if ready is not None and code == 0 else 1)
