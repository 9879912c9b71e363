#!/usr/bin/env python3
"""The compose end-to-end test: docker-compose.yml run for real, as a user runs it.

Brings the project up from images already built (deploy/e2e/run.sh builds them), then over the
published ports of the balancer:
  1. SMTP in on port 25 → the message read back over IMAPS and over POP3 with STLS; the
     Received header names the test client's address, not the balancer's (PROXY protocol);
  2. submission on 587 with STARTTLS + AUTH to a local and a remote recipient → relay-queue →
     the sink container (the remote domain's MX), and into the local mailbox;
  3. a trace with spans from at least three services reaches an OTLP receiver of our own;
  4. `--scale imap-gateway=3 --scale smtp-ingress=2 --scale relay-queue=2`: IDLE sessions spread
     over all three IMAP replicas are all told of one delivery;
  5. faults under a 20-session SMTP load: `docker kill` of each service's container and of
     PostgreSQL, each started again; afterwards every message that got 250 is in its mailbox
     exactly once (counted over IMAP) and the load recovered after every fault.
Prints a JSON summary and writes it to target/compose-e2e/result.json. Exit status 0 = passed.
"""
import argparse
import concurrent.futures
import imaplib
import ipaddress
import json
import os
import poplib
import secrets
import shutil
import smtplib
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

import grpc
from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2, metrics_service_pb2_grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
DOMAIN = "example.test"
LOAD_ACCOUNTS = [f"load{i:02d}@{DOMAIN}" for i in range(10)]
PASSWORD = "e2e-" + secrets.token_hex(8)


def log(msg):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def wait_until(pred, timeout, what, every=0.5):
    """Poll `pred` until it returns a truthy value; fail with `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    last_err = None
    while time.monotonic() < deadline:
        try:
            v = pred()
            if v:
                return v
        except Exception as e:  # a service that is restarting refuses connections
            last_err = e
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout}s waiting for {what} (last error: {last_err})")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def compose_cmd():
    if subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0:
        return ["docker", "compose"]
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    raise SystemExit("neither `docker compose` nor `docker-compose` is installed")


class Compose:
    def __init__(self, project, env):
        self.base = compose_cmd() + ["-p", project, "-f", "docker-compose.yml", "-f", "deploy/e2e/compose.e2e.yml"]
        self.env = env

    def run(self, *args, input=None, check=True, timeout=600):
        p = subprocess.run(self.base + list(args), cwd=ROOT, env=self.env, input=input,
                           capture_output=True, text=True, timeout=timeout)
        if check and p.returncode != 0:
            raise AssertionError(f"compose {' '.join(args)} failed ({p.returncode}):\n{p.stdout}\n{p.stderr}")
        return p

    def containers(self, service):
        out = self.run("ps", "-q", service).stdout.split()
        return [c for c in out if c]


def docker(*args, check=True, timeout=120):
    p = subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout)
    if check and p.returncode != 0:
        raise AssertionError(f"docker {' '.join(args)} failed: {p.stderr}")
    return p.stdout


def inspect(cid):
    return json.loads(docker("inspect", cid))[0]


def container_ip(cid):
    nets = inspect(cid)["NetworkSettings"]["Networks"]
    return next(iter(nets.values()))["IPAddress"]


def is_healthy(cid):
    st = inspect(cid)["State"]
    if not st.get("Running"):
        return False
    h = st.get("Health")
    return h is None or h.get("Status") == "healthy"


# ---- OTLP receiver ---------------------------------------------------------------------------
class Spans(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self):
        self.lock = threading.Lock()
        self.spans = []  # (trace_id hex, service.name, span name)

    def Export(self, request, context):
        with self.lock:
            for rs in request.resource_spans:
                svc = next((a.value.string_value for a in rs.resource.attributes if a.key == "service.name"), "?")
                for ss in rs.scope_spans:
                    for sp in ss.spans:
                        self.spans.append((sp.trace_id.hex(), svc, sp.name))
        return trace_service_pb2.ExportTraceServiceResponse()

    def traces(self):
        with self.lock:
            by_trace = {}
            for t, svc, _ in self.spans:
                by_trace.setdefault(t, set()).add(svc)
            return by_trace


class Metrics(metrics_service_pb2_grpc.MetricsServiceServicer):
    def Export(self, request, context):
        return metrics_service_pb2.ExportMetricsServiceResponse()


def start_otlp():
    spans = Spans()
    server = grpc.server(concurrent.futures.ThreadPoolExecutor(max_workers=4))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(spans, server)
    metrics_service_pb2_grpc.add_MetricsServiceServicer_to_server(Metrics(), server)
    port = server.add_insecure_port("0.0.0.0:0")
    server.start()
    return server, spans, port


# ---- mail clients ----------------------------------------------------------------------------
def tls_ctx():
    # The compose setup made a self-signed certificate for MAIL_HOSTNAME: encryption is under
    # test here, not the certificate chain.
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


def message(mid, frm, to, subject="e2e"):
    return (f"From: <{frm}>\r\nTo: <{', '.join(to) if isinstance(to, list) else to}>\r\n"
            f"Subject: {subject} {mid}\r\nMessage-ID: <{mid}@e2e.test>\r\nX-E2E-Id: {mid}\r\n\r\n"
            f"body of {mid}\r\n").encode()


def imap_ids(ports, user):
    """Every X-E2E-Id in the user's INBOX, with repeats (over IMAPS)."""
    m = imaplib.IMAP4_SSL("127.0.0.1", ports["IMAPS"], ssl_context=tls_ctx(), timeout=60)
    try:
        m.login(user, PASSWORD)
        typ, data = m.select("INBOX", readonly=True)
        assert typ == "OK", data
        if int(data[0]) == 0:
            return []
        typ, data = m.uid("FETCH", "1:*", "(BODY.PEEK[HEADER.FIELDS (X-E2E-ID)])")
        assert typ == "OK", data
        ids = []
        for item in data:
            if isinstance(item, tuple):
                for line in item[1].decode().splitlines():
                    if line.lower().startswith("x-e2e-id:"):
                        ids.append(line.split(":", 1)[1].strip())
        return ids
    finally:
        try:
            m.logout()
        except Exception:
            pass


def imap_header(ports, user, mid):
    m = imaplib.IMAP4_SSL("127.0.0.1", ports["IMAPS"], ssl_context=tls_ctx(), timeout=60)
    try:
        m.login(user, PASSWORD)
        m.select("INBOX", readonly=True)
        typ, data = m.uid("SEARCH", "HEADER", "X-E2E-Id", mid)
        uids = data[0].split()
        if not uids:
            return None
        typ, data = m.uid("FETCH", uids[0].decode(), "(BODY.PEEK[HEADER])")
        return data[0][1].decode()
    finally:
        m.logout()


def pop3_has(ports, user, mid):
    p = poplib.POP3("127.0.0.1", ports["POP3"], timeout=60)
    try:
        p.stls(tls_ctx())
        p.user(user)
        p.pass_(PASSWORD)
        count, _ = p.stat()
        for i in range(1, count + 1):
            _, lines, _ = p.top(i, 0)
            if any(line.decode(errors="replace") == f"X-E2E-Id: {mid}" for line in lines):
                return True
        return False
    finally:
        p.quit()


# ---- the steps -------------------------------------------------------------------------------
def wait_services_healthy(c, services, timeout=240):
    for svc in services:
        wait_until(lambda: (ids := c.containers(svc)) and all(is_healthy(i) for i in ids),
                   timeout, f"{svc} healthy")


def setup_accounts(c):
    c.run("run", "--rm", "-T", "mailctl", "domain", "add", DOMAIN)
    users = ["alice", "bob"] + [a.split("@")[0] for a in LOAD_ACCOUNTS]
    script = "set -e; for u in " + " ".join(users) + "; do printf '%s\\n' \"$PW\" | mailctl account add \"$u@" + DOMAIN + "\" --password-stdin >/dev/null; done"
    c.run("run", "--rm", "-T", "-e", f"PW={PASSWORD}", "--entrypoint", "sh", "mailctl", "-c", script)


def step_inbound(c, ports, gateway_ip, lb_ips, result):
    mid = "in-" + secrets.token_hex(6)
    with smtplib.SMTP("127.0.0.1", ports["SMTP"], timeout=60) as s:
        s.ehlo("client.e2e.test")
        s.sendmail("someone@remote.test", [f"alice@{DOMAIN}"], message(mid, "someone@remote.test", f"alice@{DOMAIN}"))
    header = wait_until(lambda: imap_header(ports, f"alice@{DOMAIN}", mid), 60, "the inbound message in IMAP")
    assert wait_until(lambda: pop3_has(ports, f"alice@{DOMAIN}", mid), 60, "the inbound message in POP3")
    received = next(l for l in header.split("\r\n") if l.startswith("Received:"))
    received += " " + header.split("\r\n")[header.split("\r\n").index(received) + 1].strip()
    result["received"] = received
    assert f"[{gateway_ip}]" in received, f"smtp-ingress did not see the client's address {gateway_ip}: {received}"
    for ip in lb_ips:
        assert f"[{ip}]" not in received, f"smtp-ingress saw the balancer {ip}: {received}"
    log(f"inbound: stored, read over IMAPS and POP3+STLS; client address {gateway_ip} seen by smtp-ingress")


def sink_messages(c):
    (sink,) = c.containers("sink")
    out = docker("exec", sink, "sh", "-c", "cat /sink/*.eml 2>/dev/null || true")
    return out


def step_submission_relay(c, ports, result):
    mid = "sub-" + secrets.token_hex(6)
    rcpts = ["carol@remote.test", f"alice@{DOMAIN}"]
    with smtplib.SMTP("127.0.0.1", ports["SUBMISSION"], timeout=60) as s:
        s.ehlo("client.e2e.test")
        s.starttls(context=tls_ctx())
        s.ehlo("client.e2e.test")
        s.login(f"bob@{DOMAIN}", PASSWORD)
        refused = s.sendmail(f"bob@{DOMAIN}", rcpts, message(mid, f"bob@{DOMAIN}", rcpts))
        assert not refused, refused
    wait_until(lambda: f"X-E2E-Id: {mid}" in sink_messages(c), 120, "the relayed message at the sink")
    wait_until(lambda: imap_header(ports, f"alice@{DOMAIN}", mid), 60, "the submitted message's local copy")
    result["relayed"] = mid
    log("submission: STARTTLS + AUTH on 587, relayed to the sink, local copy in IMAP")
    return mid


def step_trace(spans, result):
    def three():
        return [(t, s) for t, s in spans.traces().items() if len(s) >= 3]
    found = wait_until(three, 90, "a trace with spans from three services")
    trace, services = found[0]
    result["trace"] = {"trace_id": trace, "services": sorted(services), "spans_received": len(spans.spans)}
    log(f"trace {trace}: spans from {sorted(services)}")


def imap_sessions_active(cid):
    with urllib.request.urlopen(f"http://{container_ip(cid)}:9143/metrics", timeout=5) as r:
        text = r.read().decode()
    for line in text.splitlines():
        if line.startswith("mailsuite_sessions_active") and 'protocol="imap"' in line:
            return float(line.rsplit(" ", 1)[1])
    return 0.0


class Idler:
    def __init__(self, ports):
        self.m = imaplib.IMAP4_SSL("127.0.0.1", ports["IMAPS"], ssl_context=tls_ctx(), timeout=120)
        self.m.login(f"alice@{DOMAIN}", PASSWORD)
        typ, data = self.m.select("INBOX")
        self.exists = int(data[0])
        tag = self.m._new_tag().decode()
        self.m.send(f"{tag} IDLE\r\n".encode())
        line = self.m.readline()
        assert line.startswith(b"+"), line

    def wait_exists(self, above):
        # Untagged responses until one says EXISTS with more messages than at SELECT.
        while True:
            line = self.m.readline()
            if not line:
                return False
            parts = line.split()
            if len(parts) >= 3 and parts[0] == b"*" and parts[2] == b"EXISTS" and int(parts[1]) > above:
                return True


def step_scale_idle(c, ports, result):
    c.run("up", "-d", "--no-build", "--scale", "imap-gateway=3", "--scale", "smtp-ingress=2",
          "--scale", "relay-queue=2")
    wait_until(lambda: len(c.containers("imap-gateway")) == 3, 60, "three imap-gateway replicas")
    wait_services_healthy(c, ["imap-gateway", "smtp-ingress", "relay-queue"])
    imaps = c.containers("imap-gateway")
    idlers = []

    def spread():
        # The balancer learns new replicas through DNS within seconds; keep opening sessions
        # (least-connections balancing) until every replica holds one.
        idlers.append(Idler(ports))
        counts = [imap_sessions_active(i) for i in imaps]
        return all(n >= 1 for n in counts) and counts

    counts = wait_until(spread, 90, "IDLE sessions on all three imap-gateway replicas", every=1)
    mid = "idle-" + secrets.token_hex(6)
    with smtplib.SMTP("127.0.0.1", ports["SMTP"], timeout=60) as s:
        s.sendmail("someone@remote.test", [f"alice@{DOMAIN}"], message(mid, "someone@remote.test", f"alice@{DOMAIN}"))
    with concurrent.futures.ThreadPoolExecutor(len(idlers)) as ex:
        notified = list(ex.map(lambda i: i.wait_exists(i.exists), idlers))
    for i in idlers:
        try:
            i.m.shutdown()
        except Exception:
            pass
    assert all(notified), f"{notified.count(False)} of {len(idlers)} IDLE sessions were not notified"
    result["scale"] = {"imap_replicas": 3, "sessions_per_replica": counts, "idle_sessions_notified": len(idlers)}
    log(f"scale: {len(idlers)} IDLE sessions over 3 replicas ({counts}) all notified")


class Load:
    """20 SMTP sessions in a loop, one message per connection, to the load accounts."""

    def __init__(self, ports, sessions=20):
        self.ports, self.stop = ports, threading.Event()
        self.lock = threading.Lock()
        self.acked, self.failed, self.errors = [], 0, {}
        self.run_id = secrets.token_hex(4)
        self.threads = [threading.Thread(target=self.worker, args=(i,), daemon=True) for i in range(sessions)]
        for t in self.threads:
            t.start()

    def worker(self, i):
        n = 0
        while not self.stop.is_set():
            n += 1
            mid = f"load-{self.run_id}-{i}-{n}"
            to = LOAD_ACCOUNTS[(i + n) % len(LOAD_ACCOUNTS)]
            try:
                s = smtplib.SMTP("127.0.0.1", self.ports["SMTP"], timeout=60)
                try:
                    s.ehlo("load.e2e.test")
                    s.sendmail("loader@remote.test", [to], message(mid, "loader@remote.test", to))
                    with self.lock:
                        self.acked.append((mid, to))
                finally:
                    try:
                        s.quit()
                    except Exception:
                        pass
            except Exception as e:
                with self.lock:
                    self.failed += 1
                    why = f"{type(e).__name__}: {e}"[:90]
                    self.errors[why] = self.errors.get(why, 0) + 1
                # Pace a client that is refused while a service restarts (not a wait for state).
                time.sleep(0.2)

    def count(self):
        with self.lock:
            return len(self.acked), self.failed

    def finish(self):
        self.stop.set()
        for t in self.threads:
            t.join(120)


def step_faults(c, ports, result):
    load = Load(ports)
    faults = []
    try:
        wait_until(lambda: load.count()[0] >= 50, 120, "the load to start")
        for svc in ["smtp-ingress", "mailbox-store", "relay-queue", "imap-gateway", "pop3-gateway", "postgres"]:
            cid = c.containers(svc)[0]
            acked0, failed0 = load.count()
            started0 = inspect(cid)["State"]["StartedAt"]
            docker("kill", cid)
            killed_at = time.monotonic()
            docker("start", cid)
            wait_until(lambda: is_healthy(cid), 180, f"{svc} healthy after kill")
            assert inspect(cid)["State"]["StartedAt"] != started0, f"{svc} was not restarted"
            # Everything that depends on PostgreSQL must be healthy again too.
            wait_services_healthy(c, ["mailbox-store", "relay-queue", "smtp-ingress"], timeout=180)
            acked1, _ = load.count()
            wait_until(lambda: load.count()[0] >= acked1 + 40, 180, f"the load to recover after killing {svc}")
            acked2, failed2 = load.count()
            faults.append({"killed": svc, "acked_before": acked0, "acked_after_recovery": acked2,
                           "failed_attempts_during": failed2 - failed0,
                           "seconds_to_recover": round(time.monotonic() - killed_at, 1)})
            log(f"fault {svc}: {failed2 - failed0} refused attempts, load recovered in {faults[-1]['seconds_to_recover']}s")
    finally:
        load.finish()
    acked, failed = load.count()
    stored = {}
    for user in LOAD_ACCOUNTS:
        for mid in imap_ids(ports, user):
            if mid.startswith(f"load-{load.run_id}-"):
                stored[mid] = stored.get(mid, 0) + 1
    acked_ids = {mid for mid, _ in load.acked}
    lost = sorted(acked_ids - stored.keys())
    duplicated = sorted(m for m, n in stored.items() if n > 1)
    summary = {"faults": faults, "acknowledged": len(acked_ids), "failed_attempts": failed,
               "stored": sum(stored.values()), "stored_distinct": len(stored),
               "stored_without_250": len(stored.keys() - acked_ids),
               "lost": len(lost), "duplicated": len(duplicated),
               "refusals": dict(sorted(load.errors.items(), key=lambda kv: -kv[1])[:8])}
    result["fault_run"] = summary
    log(f"faults: {summary}")
    assert not lost, f"{len(lost)} acknowledged messages are not in their mailbox: {lost[:10]}"
    assert not duplicated, f"{len(duplicated)} messages stored more than once: {duplicated[:10]}"


def step_upgrade(c, ports, result, before_mid):
    """The README's upgrade: new images, `docker compose up -d`: the migration job runs again
    before the services restart on the new images, and the mail stays."""
    new_tag = c.env["MAILSUITE_TAG"] + "-upgrade"
    prefix = c.env.get("MAILSUITE_IMAGE_PREFIX", "mailsuite")
    for image in ["mailbox-store", "relay-queue", "smtp-ingress", "pop3-gateway", "imap-gateway", "mailctl",
                  "postgres", "haproxy"]:
        docker("tag", f"{prefix}/{image}:{c.env['MAILSUITE_TAG']}", f"{prefix}/{image}:{new_tag}")
    (old_migrate,) = c.containers("migrate")
    c.env["MAILSUITE_TAG"] = new_tag
    try:
        c.run("up", "-d", "--no-build")
        (migrate,) = wait_until(lambda: (m := c.containers("migrate")) and m[0] != old_migrate and m, 120,
                                "a new migration job")
        state = wait_until(lambda: (st := inspect(migrate)["State"])["Status"] == "exited" and st, 180,
                           "the migration job to finish")
        assert state["ExitCode"] == 0, f"migration job failed: {docker('logs', migrate)}"
        wait_services_healthy(c, ["mailbox-store", "relay-queue", "smtp-ingress", "pop3-gateway", "imap-gateway"])
        for svc in ["mailbox-store", "smtp-ingress", "imap-gateway"]:
            images = {inspect(cid)["Config"]["Image"] for cid in c.containers(svc)}
            assert images == {f"{prefix}/{svc}:{new_tag}"}, f"{svc} runs {images} after the upgrade"
        assert wait_until(lambda: imap_header(ports, f"alice@{DOMAIN}", before_mid), 60,
                          "mail from before the upgrade")
        mid = "up-" + secrets.token_hex(6)
        with smtplib.SMTP("127.0.0.1", ports["SMTP"], timeout=60) as s:
            s.sendmail("someone@remote.test", [f"alice@{DOMAIN}"], message(mid, "someone@remote.test", f"alice@{DOMAIN}"))
        wait_until(lambda: imap_header(ports, f"alice@{DOMAIN}", mid), 60, "mail after the upgrade")
    finally:
        for image in ["mailbox-store", "relay-queue", "smtp-ingress", "pop3-gateway", "imap-gateway", "mailctl",
                      "postgres", "haproxy"]:
            docker("rmi", "--no-prune", f"{prefix}/{image}:{new_tag}", check=False)
    result["upgrade"] = {"tag": new_tag, "migration_job_exit": 0, "mail_kept": True}
    log(f"upgrade: up -d with images {new_tag}: migration ran again, services replaced, mail kept")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--project", default="mailsuite-e2e")
    ap.add_argument("--keep", action="store_true", help="leave the project running afterwards")
    args = ap.parse_args()

    server, spans, otlp_port = start_otlp()
    tmp = tempfile.mkdtemp(prefix="mailsuite-e2e-")
    ports = {n: free_port() for n in ["SMTP", "SUBMISSION", "SUBMISSIONS", "POP3", "POP3S", "IMAP", "IMAPS"]}
    env = dict(os.environ)
    env.update({f"MAIL_PORT_{n}": str(p) for n, p in ports.items()})
    env.update({
        "MAIL_BIND": "127.0.0.1",
        "MAIL_HOSTNAME": "mail.example.test",
        "MAILSUITE_TAG": os.environ.get("MAILSUITE_TAG", "dev"),
        "MAILSUITE_INTERNAL_TOKEN": secrets.token_hex(32),
        "POSTGRES_PASSWORD": secrets.token_hex(16),
        "MAILSUITE_CERTS_DIR": os.path.join(tmp, "certs"),
        "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://host.docker.internal:{otlp_port}",
    })
    c = Compose(args.project, env)
    result = {"project": args.project}
    started = time.monotonic()
    ok = False
    try:
        c.run("down", "-v", "--remove-orphans", check=False)
        log("compose up")
        c.run("up", "-d", "--no-build")
        wait_services_healthy(c, ["postgres", "mailbox-store", "relay-queue", "smtp-ingress",
                                  "pop3-gateway", "imap-gateway"])
        setup_accounts(c)
        net = next(iter(inspect(c.containers("mail-lb")[0])["NetworkSettings"]["Networks"].values()))
        gateway_ip = net["Gateway"]
        lb_ips = [container_ip(i) for i in c.containers("mail-lb")]
        step_inbound(c, ports, gateway_ip, lb_ips, result)
        relayed = step_submission_relay(c, ports, result)
        step_trace(spans, result)
        step_scale_idle(c, ports, result)
        step_faults(c, ports, result)
        step_upgrade(c, ports, result, relayed)
        ok = True
    finally:
        result["passed"] = ok
        result["seconds"] = round(time.monotonic() - started, 1)
        out = os.path.join(ROOT, "target", "compose-e2e")
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, "result.json"), "w") as f:
            json.dump(result, f, indent=2)
        print(json.dumps(result, indent=2))
        if not ok:
            logs = c.run("logs", "--no-color", "--tail", "60", check=False)
            print(logs.stdout[-20000:], file=sys.stderr)
        if not args.keep:
            c.run("down", "-v", "--remove-orphans", check=False)
        server.stop(0)
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
