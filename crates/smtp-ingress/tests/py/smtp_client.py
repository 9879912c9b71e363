#!/usr/bin/env python3
"""An independent SMTP client (Python's smtplib) for smtp-ingress end-to-end tests.

Sends one message and prints one JSON line: {"ok": true, "refused": {...}} on success,
{"ok": false, "code": N, "text": "..."} when the server refused it. Exits non-zero only on
an unexpected failure (connection, TLS, protocol), so the Rust test sees the server's answer.
"""
import argparse
import json
import smtplib
import ssl
import sys
from email.message import EmailMessage


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--mode", choices=["plain", "starttls", "ssl"], default="plain")
    p.add_argument("--ca")
    p.add_argument("--user")
    p.add_argument("--password")
    p.add_argument("--mech", choices=["PLAIN", "LOGIN"], default="PLAIN")
    p.add_argument("--sender", required=True)
    p.add_argument("--to", action="append", required=True)
    p.add_argument("--subject", default="hello from smtplib")
    p.add_argument("--header-from")
    p.add_argument("--header-sender")
    a = p.parse_args()

    ctx = None
    if a.mode != "plain":
        ctx = ssl.create_default_context(cafile=a.ca)
    if a.mode == "ssl":
        s = smtplib.SMTP_SSL("localhost", a.port, context=ctx, timeout=20)
    else:
        s = smtplib.SMTP("localhost", a.port, timeout=20)
    s.ehlo("client.remote.example")
    if a.mode == "starttls":
        code, _ = s.starttls(context=ctx)
        assert code == 220, code
        s.ehlo("client.remote.example")
    info = {"esmtp": sorted(s.esmtp_features.keys())}
    try:
        if a.user:
            s.user, s.password = a.user, a.password
            if a.mech == "PLAIN":
                s.auth("PLAIN", s.auth_plain)
            else:
                s.auth("LOGIN", s.auth_login)
        m = EmailMessage()
        m["From"] = a.header_from or a.sender
        m["To"] = ", ".join(a.to)
        if a.header_sender:
            m["Sender"] = a.header_sender
        m["Subject"] = a.subject
        m["Message-ID"] = "<smtplib-test@remote.example>"
        m.set_content("Hello,\n.leading dot line\nbye\n")
        refused = s.send_message(m, from_addr=a.sender, to_addrs=a.to)
        info.update(ok=True, refused={k: [v[0], v[1].decode()] for k, v in refused.items()})
    except smtplib.SMTPRecipientsRefused as e:
        first = next(iter(e.recipients.values()))
        info.update(ok=False, code=first[0], text=first[1].decode())
    except smtplib.SMTPResponseException as e:
        info.update(ok=False, code=e.smtp_code, text=e.smtp_error.decode())
    print(json.dumps(info))
    try:
        s.quit()
    except smtplib.SMTPServerDisconnected:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
