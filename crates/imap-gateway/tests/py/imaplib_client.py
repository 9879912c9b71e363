"""An independent IMAP client (Python's imaplib) against the gateway.

Usage: imaplib_client.py HOST IMAP_PORT IMAPS_PORT CA_PEM USER PASSWORD MESSAGE_FILE
The account's INBOX holds exactly one message, the bytes of MESSAGE_FILE.
Exits non-zero (with a message) on the first failed expectation.
"""

import imaplib
import ssl
import sys


def check(cond, what, data=None):
    if not cond:
        print(f"FAILED: {what}: {data!r}", file=sys.stderr)
        sys.exit(1)


def ok(resp, what):
    typ, data = resp
    check(typ == "OK", what, data)
    return data


def main():
    host, port, sport, ca, user, password, msg_file = sys.argv[1:8]
    with open(msg_file, "rb") as f:
        message = f.read()
    ctx = ssl.create_default_context(cafile=ca)

    # STARTTLS on the plain port: LOGIN is refused before TLS.
    m = imaplib.IMAP4(host, int(port))
    check("STARTTLS" in m.capabilities, "STARTTLS advertised", m.capabilities)
    check("LOGINDISABLED" in m.capabilities, "LOGINDISABLED before TLS", m.capabilities)
    ok(m.starttls(ssl_context=ctx), "starttls")
    check("AUTH=PLAIN" in m.capabilities, "AUTH=PLAIN after TLS", m.capabilities)
    ok(m.login(user, password), "login")

    boxes = ok(m.list(), "list")
    flat = b"\n".join(boxes)
    for attr, name in [(b"\\Sent", b"Sent"), (b"\\Trash", b"Trash"), (b"\\Drafts", b"Drafts")]:
        line = [b for b in boxes if b.endswith(b'"/" ' + name)]
        check(line and attr in line[0], f"{name} has {attr}", flat)

    data = ok(m.select("INBOX"), "select")
    check(data == [b"1"], "one message", data)

    data = ok(m.fetch("1", "(RFC822.SIZE BODY.PEEK[])"), "fetch")
    check(data[0][1] == message, "byte-exact BODY[]", data)
    check(b"RFC822.SIZE %d" % len(message) in data[0][0], "RFC822.SIZE", data)

    data = ok(m.fetch("1", "(BODYSTRUCTURE ENVELOPE)"), "fetch structure")
    check(b"BODYSTRUCTURE" in data[0] and b"ENVELOPE" in data[0], "structure items", data)

    data = ok(m.search(None, "SUBJECT", "hello"), "search")
    check(data == [b"1"], "search subject", data)
    data = ok(m.search(None, "UNSEEN"), "search unseen")
    check(data == [b"1"], "unseen", data)

    ok(m.store("1", "+FLAGS", "(\\Seen \\Flagged)"), "store")
    data = ok(m.fetch("1", "(FLAGS)"), "fetch flags")
    check(b"\\Seen" in data[0] and b"\\Flagged" in data[0], "flags stored", data)

    ok(m.create("Archive/2026"), "create")
    typ, data = m.copy("1", "Archive/2026")
    check(typ == "OK", "copy", data)
    typ, code = m.response("COPYUID")
    check(code and code[0] and code[0].split()[1:] == [b"1", b"1"], "COPYUID", code)

    typ, data = m.append("INBOX", "(\\Draft)", imaplib.Time2Internaldate(1_700_000_000), b"Subject: appended\r\n\r\nhi\r\n")
    check(typ == "OK", "append", data)
    typ, code = m.response("APPENDUID")
    check(code and code[0] and code[0].split()[1] == b"2", "APPENDUID", code)

    typ, data = m.uid("MOVE", "2", "Trash")
    check(typ == "OK", "uid move", data)
    ok(m.store("1", "+FLAGS", "(\\Deleted)"), "store deleted")
    typ, data = m.expunge()
    # imaplib accumulates untagged EXPUNGEs: message 2 went with the MOVE, then message 1.
    check(typ == "OK" and data == [b"2", b"1"], "MOVE and EXPUNGE report their messages", data)

    ok(m.rename("Archive", "Old"), "rename hierarchy")
    boxes = ok(m.list('""', "Old/*"), "list renamed")
    check(any(b.endswith(b'"/" Old/2026') for b in boxes), "child moved with parent", boxes)
    typ, data = m.status("Old/2026", "(MESSAGES UIDNEXT)")
    check(typ == "OK" and b"MESSAGES 1" in data[0], "status", data)
    ok(m.delete("Old/2026"), "delete")

    imaplib.Commands["FROB"] = ("AUTH", "SELECTED")
    try:
        m._simple_command("FROB")
        check(False, "FROB accepted")
    except imaplib.IMAP4.error as e:
        check("BAD" in str(e), "unknown command gets BAD", str(e))
    ok(m.noop(), "connection lives after BAD")
    m.logout()

    # Implicit TLS.
    s = imaplib.IMAP4_SSL(host, int(sport), ssl_context=ctx)
    ok(s.login(user, password), "login 993")
    typ, data = s.namespace()
    check(typ == "OK" and data[0] == b'(("" "/")) NIL NIL', "namespace", data)
    data = ok(s.select("Trash", readonly=True), "examine")
    check(data == [b"1"], "moved message in Trash", data)
    s.logout()
    print("imaplib: all checks passed")


main()
