#!/usr/bin/env python3
"""An independent POP3 client (Python's poplib) driving pop3-gateway end to end.

Usage: pop3_client.py SCENARIO JSON-ARGS
Every scenario exits non-zero with a message on stderr when anything disagrees, and prints a
JSON object on stdout for the Rust test to check further. Every socket has a timeout, so a
server that hangs fails the scenario instead of blocking it.
"""

import base64
import json
import poplib
import ssl
import sys

TIMEOUT = 20


def fail(msg):
    print(f"FAIL: {msg}", file=sys.stderr)
    sys.exit(1)


def check(cond, msg):
    if not cond:
        fail(msg)


def context(a):
    ctx = ssl.create_default_context(cafile=a["ca"])
    ctx.check_hostname = True
    return ctx


def connect(a, via):
    """A session in the AUTHORIZATION state over TLS: STLS on the plain port, or port 995."""
    if via == "stls":
        p = poplib.POP3("127.0.0.1", a["pop3"], timeout=TIMEOUT)
        caps = p.capa()
        check("STLS" in caps, f"STLS advertised before TLS: {caps}")
        check("USER" not in caps, f"USER must not be offered before TLS: {caps}")
        try:
            p.user(a["user"])
            fail("USER accepted before TLS")
        except poplib.error_proto as e:
            check(str(e).startswith("b'-ERR [AUTH]"), f"USER before TLS: {e}")
        p.stls(context(a))
    else:
        p = poplib.POP3_SSL("127.0.0.1", a["pop3s"], context=context(a), timeout=TIMEOUT)
    caps = p.capa()
    for c in ["TOP", "UIDL", "USER", "SASL", "RESP-CODES", "AUTH-RESP-CODE", "PIPELINING"]:
        check(c in caps, f"{c} missing from CAPA over TLS: {caps}")
    check("STLS" not in caps, f"STLS offered over TLS: {caps}")
    check(caps["SASL"] == ["PLAIN"], f"SASL mechanisms: {caps['SASL']}")
    return p


def login(p, a, how="user"):
    if how == "user":
        p.user(a["user"])
        return p.pass_(a["password"])
    raw = b"\0" + a["user"].encode() + b"\0" + a["password"].encode()
    return p._shortcmd("AUTH PLAIN " + base64.b64encode(raw).decode())


def expect_err(p, line, prefix=b"-ERR"):
    try:
        r = p._shortcmd(line)
    except poplib.error_proto as e:
        resp = e.args[0]
        check(resp.startswith(prefix), f"{line!r}: {resp!r} does not start with {prefix!r}")
        return resp
    fail(f"{line!r} was accepted: {r!r}")


def maildrop(a):
    """Read and verify everything, then DELE the messages named in a['delete'] and QUIT,
    or drop the connection without QUIT when a['drop'] is set."""
    p = connect(a, a["via"])
    resp = login(p, a, a.get("login", "user"))
    check(resp.startswith(b"+OK"), f"login: {resp!r}")
    expected = [open(path, "rb").read() for path in a["messages"]]

    count, size = p.stat()
    check(count == len(expected), f"STAT count {count} != {len(expected)}")
    check(size == sum(map(len, expected)), f"STAT size {size} != {sum(map(len, expected))}")
    _, listing, _ = p.list()
    sizes = [int(l.split()[1]) for l in listing]
    check(sizes == [len(m) for m in expected], f"LIST {sizes}")
    check(p.list(1).split()[2] == str(len(expected[0])).encode(), "LIST 1")
    _, uidl, _ = p.uidl()
    uids = [l.split()[1].decode() for l in uidl]
    check(len(set(uids)) == len(uids), f"UIDL values are unique: {uids}")
    check(p.uidl(1).split()[2].decode() == uids[0], "UIDL 1 agrees with UIDL")

    for i, m in enumerate(expected, 1):
        resp, lines, _ = p.retr(i)
        check(resp == b"+OK %d octets" % len(m), f"RETR {i}: {resp!r}")
        got = b"\r\n".join(lines) + b"\r\n"
        check(got == m, f"RETR {i} differs:\n{got!r}\n!=\n{m!r}")

    n = a.get("top_lines", 2)
    for i, m in enumerate(expected, 1):
        lines = m.split(b"\r\n")[:-1]
        h = lines.index(b"") if b"" in lines else len(lines)
        want = lines[: h + 1 + n]
        _, got, _ = p.top(i, n)
        check(got == want, f"TOP {i} {n}:\n{got!r}\n!=\n{want!r}")

    # Bad input gets -ERR, promptly, and the session goes on.
    expect_err(p, "XYZZY")
    expect_err(p, "RETR %d" % (len(expected) + 1))
    expect_err(p, "RETR abc")
    expect_err(p, "TOP 1")
    expect_err(p, "USER again")
    expect_err(p, "A" * 5000)
    check(p.noop().startswith(b"+OK"), "NOOP after errors")

    for i in a.get("delete", []):
        check(p.dele(i).startswith(b"+OK"), f"DELE {i}")
        expect_err(p, f"RETR {i}")
    count, _ = p.stat()
    check(count == len(expected) - len(a.get("delete", [])), "STAT after DELE")
    if a.get("drop"):
        p.sock.close()
        return {"uidl": uids, "quit": None}
    resp = p.quit()
    check(resp.startswith(b"+OK"), f"QUIT: {resp!r}")
    return {"uidl": uids, "quit": resp.decode()}


def in_use(a):
    """A second session for the same maildrop, through another gateway, gets [IN-USE]."""
    first = connect(dict(a, pop3s=a["pop3s"]), "ssl")
    login(first, a)
    second = connect(dict(a, pop3s=a["other_pop3s"]), "ssl")
    second.user(a["user"])
    resp = expect_err(second, "PASS " + a["password"], b"-ERR [IN-USE]")
    check(first.quit().startswith(b"+OK"), "first QUIT")
    # The lock is gone with the first session: the second may log in now.
    check(login(second, a, "plain").startswith(b"+OK"), "login after release")
    second.quit()
    return {"in_use": resp.decode()}


def bad_login(a):
    p = connect(a, "ssl")
    p.user(a["user"])
    resp = expect_err(p, "PASS wrong-" + a["password"], b"-ERR [AUTH]")
    resp2 = expect_err(p, "AUTH PLAIN " + base64.b64encode(b"\0nobody@nowhere.test\0x").decode(), b"-ERR [AUTH]")
    return {"user_pass": resp.decode(), "auth_plain": resp2.decode()}


def smtp_pop3_imap(a):
    """Mail arrives over SMTP (port-25 role); POP3 agrees with it; DELE+QUIT removes the
    message from what IMAP sees, and IMAP serves the other one byte for byte as POP3 did."""
    import imaplib
    import smtplib

    sent = []
    for i in range(3):
        body = "".join(f"{'.' if n % 3 == 0 else ''}line {n} of message {i}\r\n" for n in range(5 + i))
        sent.append(
            (
                "From: Outside <sender@outside.example>\r\n"
                f"To: {a['user']}\r\n"
                f"Subject: flow {i}\r\n"
                f"Message-ID: <pop3-flow-{i}@outside.example>\r\n"
                "\r\n" + body
            ).encode()
        )
    with smtplib.SMTP("127.0.0.1", a["smtp"], local_hostname="mta.outside.example", timeout=TIMEOUT) as s:
        for m in sent:
            check(s.sendmail("sender@outside.example", [a["user"]], m) == {}, "SMTP accepted")

    # The 250 came after the commit: POP3 sees all of it at once.
    p = connect(a, "stls")
    check(login(p, a).startswith(b"+OK"), "login")
    count, total = p.stat()
    check(count == len(sent), f"STAT {count} messages after {len(sent)} deliveries")
    _, listing, _ = p.list()
    sizes = [int(l.split()[1]) for l in listing]
    check(sum(sizes) == total, "STAT total is the sum of LIST")
    _, uidl, _ = p.uidl()
    uids = [l.split()[1].decode() for l in uidl]
    check(len(set(uids)) == count, "UIDL unique")
    retrieved = []
    for i, m in enumerate(sent, 1):
        resp, lines, _ = p.retr(i)
        raw = b"\r\n".join(lines) + b"\r\n"
        # The MX prepends trace fields (Received, Return-Path ...); the rest is as sent.
        check(raw.endswith(m), f"RETR {i} ends with the message as sent")
        check(resp == b"+OK %d octets" % len(raw) and sizes[i - 1] == len(raw), f"RETR {i} size")
        _, top, _ = p.top(i, 1)
        head = raw.split(b"\r\n\r\n")[0].split(b"\r\n")
        check(top == head + [b"", m.split(b"\r\n\r\n")[1].split(b"\r\n")[0]], f"TOP {i} 1")
        retrieved.append(raw)
    check(p.dele(1).startswith(b"+OK"), "DELE 1")
    check(p.quit().startswith(b"+OK"), "QUIT")

    m = imaplib.IMAP4("127.0.0.1", a["imap"], timeout=TIMEOUT)
    m.starttls(ssl_context=context(a))
    m.login(a["user"], a["password"])
    typ, data = m.select("INBOX")
    check(typ == "OK" and int(data[0]) == len(sent) - 1, f"IMAP EXISTS after POP3 DELE+QUIT: {data}")
    typ, data = m.search(None, "SUBJECT", '"flow 0"')
    check(typ == "OK" and data[0].split() == [], "the deleted message is gone in IMAP")
    typ, data = m.fetch("1", "(BODY.PEEK[])")
    check(typ == "OK" and data[0][1] == retrieved[1], "IMAP BODY[] equals POP3 RETR")
    typ, data = m.fetch("1", "(FLAGS)")
    check(b"\\Seen" in data[0], f"retrieved over POP3 reads as seen in IMAP: {data}")
    m.logout()
    return {"uidl": uids}


SCENARIOS = {
    "maildrop": maildrop,
    "in_use": in_use,
    "bad_login": bad_login,
    "smtp_pop3_imap": smtp_pop3_imap,
}

if __name__ == "__main__":
    try:
        out = SCENARIOS[sys.argv[1]](json.loads(sys.argv[2]))
    except (poplib.error_proto, OSError, ssl.SSLError) as e:
        fail(f"{type(e).__name__}: {e}")
    print(json.dumps(out))
