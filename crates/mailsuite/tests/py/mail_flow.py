"""Independent clients (Python stdlib) exercise the whole system:
an MTA delivers over SMTP (port-25 role), the user reads it over IMAP (STARTTLS) and POP3 (STLS),
submits a message over submission (STARTTLS + AUTH) to another local user, and that arrives too;
then a ~3 MB message goes in over SMTP and comes out byte-exact over IMAP and POP3.

usage: mail_flow.py SMTP SUBMISSION IMAP POP3 CAFILE USER PASSWORD OTHER_USER OTHER_PASSWORD
Exits non-zero with a message on the first failure; prints OK lines as it goes.
"""
import email
import imaplib
import poplib
import smtplib
import ssl
import sys
import time

smtp_port, sub_port, imap_port, pop3_port = (int(x) for x in sys.argv[1:5])
cafile, user, password, other, other_password = sys.argv[5:10]
ctx = ssl.create_default_context(cafile=cafile)
ctx.check_hostname = True

def check(cond, what):
    if not cond:
        print("FAIL:", what, flush=True)
        sys.exit(1)
    print("OK", what, flush=True)

# 1. Inbound delivery from an outside sender on the MX port.
msg = (
    "From: Outside Sender <sender@outside.example>\r\n"
    f"To: {user}\r\n"
    "Subject: hello from outside\r\n"
    "Message-ID: <flow-1@outside.example>\r\n"
    "\r\n"
    "First line.\r\n"
    ".leading dot line\r\n"
    "Last line.\r\n"
)
with smtplib.SMTP("127.0.0.1", smtp_port, local_hostname="mta.outside.example", timeout=30) as s:
    code, _ = s.ehlo()
    check(code == 250, "EHLO on MX port")
    refused = s.sendmail("sender@outside.example", [user], msg)
    check(refused == {}, "MX accepted the message")
    try:
        s.sendmail("sender@outside.example", ["someone@not-hosted.example"], msg)
        check(False, "relay to a foreign domain refused on MX port")
    except smtplib.SMTPRecipientsRefused as e:
        code = list(e.recipients.values())[0][0]
        check(code in (550, 554), f"relay to a foreign domain refused ({code})")

# 2. Read it over IMAP after STARTTLS.
def imap_fetch_all(expect_subject, timeout=10.0, login=None):
    login = login or (user, password)
    deadline = time.time() + timeout
    while True:
        m = imaplib.IMAP4("127.0.0.1", imap_port, timeout=30)
        m.starttls(ssl_context=ctx)
        m.login(*login)
        typ, data = m.select("INBOX")
        typ, data = m.uid("SEARCH", None, "ALL")
        uids = data[0].split()
        found = None
        for uid in uids:
            typ, fetched = m.uid("FETCH", uid, "(BODY.PEEK[])")
            raw = fetched[0][1]
            if expect_subject.encode() in raw:
                found = raw
        m.logout()
        if found is not None:
            return found
        if time.time() > deadline:
            check(False, f"IMAP shows a message with subject {expect_subject!r}")
        time.sleep(0.05)

raw = imap_fetch_all("hello from outside")
parsed = email.message_from_bytes(raw)
check(parsed["Received"] is not None, "Received: trace header added")
check(parsed["Return-Path"] is not None and "sender@outside.example" in parsed["Return-Path"], "Return-Path added")
check(b"\r\n.leading dot line\r\n" in raw, "dot-unstuffed body, byte-exact line")
check(raw.endswith(b"Last line.\r\n"), "body intact to the end")

# 3. The same message over POP3 after STLS.
p = poplib.POP3("127.0.0.1", pop3_port, timeout=30)
p.stls(context=ctx)
p.user(user)
p.pass_(password)
count, size = p.stat()
check(count >= 1, "POP3 STAT counts the message")
resp, lines, octets = p.retr(1)
check(b"Subject: hello from outside" in b"\r\n".join(lines), "POP3 RETR returns it")
p.quit()

# 4. Submission with STARTTLS + AUTH to another local user.
with smtplib.SMTP("127.0.0.1", sub_port, timeout=30) as s:
    s.ehlo()
    s.starttls(context=ctx)
    s.ehlo()
    s.login(user, password)
    sub = (
        f"From: {user}\r\nTo: {other}\r\nSubject: internal note\r\n"
        "Message-ID: <flow-2@local>\r\n\r\nhi colleague\r\n"
    )
    check(s.sendmail(user, [other], sub) == {}, "submission accepted after STARTTLS+AUTH")
raw = imap_fetch_all("internal note", login=(other, other_password))
check(b"hi colleague" in raw, "the submitted message reached the other user's INBOX")
# 5. A large message, byte-exact both ways out: many 64 KiB gRPC chunks in and out, read by
# range in the store (beyond the inline size), beyond the IMAP gateway's read-ahead buffer and
# the POP3 gateway's window (1 MiB each), lines with leading dots throughout.
big_lines = []
for i in range(40000):
    lead = b".." if i % 5 == 0 else b""
    big_lines.append(lead + b"big line %06d " % i + bytes(range(33, 33 + 50)) + b"\r\n")
big = (
    f"From: Outside Sender <sender@outside.example>\r\nTo: {user}\r\n"
    "Subject: a large one\r\nMessage-ID: <flow-big@outside.example>\r\n\r\n"
).encode() + b"".join(big_lines)
with smtplib.SMTP("127.0.0.1", smtp_port, local_hostname="mta.outside.example", timeout=60) as s:
    check(s.sendmail("sender@outside.example", [user], big) == {}, f"MX accepted {len(big)} bytes")
raw = imap_fetch_all("a large one")
check(raw.endswith(big) and len(raw) - len(big) < 4096, "IMAP BODY[] of the large message is byte-exact")
p = poplib.POP3("127.0.0.1", pop3_port, timeout=60)
p.stls(context=ctx)
p.user(user)
p.pass_(password)
count, size = p.stat()
resp, lines, octets = p.retr(count)
p.quit()
got = b"\r\n".join(lines) + b"\r\n"
check(got.endswith(big) and len(got) - len(big) < 4096, "POP3 RETR of the large message is byte-exact")
print("ALL OK", flush=True)
