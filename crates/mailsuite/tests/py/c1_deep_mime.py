"""C1: deeply nested MIME through independent clients (Python stdlib).

usage: c1_deep_mime.py send SMTP IMAP CAFILE USER PASSWORD SMTP_FILE APPEND_FILE
       c1_deep_mime.py check IMAP CAFILE USER PASSWORD FILE...
send: delivers SMTP_FILE on the MX port and APPENDs APPEND_FILE over IMAP (STARTTLS).
check: every FILE is in INBOX, byte-exact (a delivered copy may only have trace fields
prepended); BODYSTRUCTURE and BODY[1] of each answer. Exits non-zero on the first failure.
"""
import imaplib
import smtplib
import ssl
import sys


def check(cond, what):
    if not cond:
        print("FAIL:", what, flush=True)
        sys.exit(1)
    print("OK", what, flush=True)


def imap_login(port, cafile, user, password):
    ctx = ssl.create_default_context(cafile=cafile)
    m = imaplib.IMAP4("127.0.0.1", port, timeout=300)
    m.starttls(ssl_context=ctx)
    m.login(user, password)
    return m


mode = sys.argv[1]
if mode == "send":
    smtp_port, imap_port = int(sys.argv[2]), int(sys.argv[3])
    cafile, user, password, smtp_file, append_file = sys.argv[4:9]
    raw = open(smtp_file, "rb").read()
    with smtplib.SMTP("127.0.0.1", smtp_port, local_hostname="mta.outside.example", timeout=300) as s:
        refused = s.sendmail("sender@outside.example", [user], raw)
        check(refused == {}, "MX port accepted the deep message")
    raw = open(append_file, "rb").read()
    m = imap_login(imap_port, cafile, user, password)
    typ, data = m.append("INBOX", None, None, raw)
    check(typ == "OK", f"APPEND of the deep message: {typ} {data}")
    m.logout()
    print("SENT", flush=True)
elif mode == "check":
    imap_port = int(sys.argv[2])
    cafile, user, password = sys.argv[3:6]
    files = [open(f, "rb").read() for f in sys.argv[6:]]
    m = imap_login(imap_port, cafile, user, password)
    typ, data = m.select("INBOX")
    check(typ == "OK", "SELECT INBOX")
    typ, data = m.uid("SEARCH", None, "ALL")
    uids = data[0].split()
    check(len(uids) == len(files), f"{len(files)} messages in INBOX (found {len(uids)})")
    bodies = []
    for uid in uids:
        typ, data = m.uid("FETCH", uid, "(BODY.PEEK[])")
        check(typ == "OK" and isinstance(data[0], tuple), f"FETCH BODY[] of UID {uid!r}")
        bodies.append(data[0][1])
        typ, data = m.uid("FETCH", uid, "(BODYSTRUCTURE)")
        check(typ == "OK" and data[0] is not None, f"FETCH BODYSTRUCTURE of UID {uid!r}")
        flat = b"".join(d if isinstance(d, bytes) else b"".join(d) for d in data)
        check(b"OCTET-STREAM" in flat.upper(), "the too-deep levels are one opaque part")
        typ, data = m.uid("FETCH", uid, "(BODY.PEEK[1])")
        check(typ == "OK" and isinstance(data[0], tuple), f"FETCH BODY[1] of UID {uid!r}")
        check(data[0][1].startswith(b'Content-Type: multipart/mixed; boundary="b2"'), "BODY[1] is sliced from the raw bytes")
    for i, want in enumerate(files):
        found = [b for b in bodies if b == want or (b.endswith(want) and b"\r\n\r\n" not in b[: len(b) - len(want)])]
        check(len(found) == 1, f"message {i} ({len(want)} bytes) is stored byte-exact")
    m.logout()
    print("ALL OK", flush=True)
else:
    sys.exit(f"unknown mode {mode}")
