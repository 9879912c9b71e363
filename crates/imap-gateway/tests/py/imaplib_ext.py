"""Python's imaplib against the gateway's ESEARCH, SEARCHRES and IMAP4rev2 support.

Usage: imaplib_ext.py HOST IMAPS_PORT CA_PEM USER PASSWORD
The account's INBOX holds exactly three messages, subjects "one", "two", "three".
Raw commands go through imap._simple_command; untagged responses are read from
imap.untagged_responses. Exits non-zero (with a message) on the first failed expectation.
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


def esearch(m, *args):
    """Run a raw SEARCH/UID SEARCH; return the ESEARCH payloads (and the tagged status)."""
    m.untagged_responses.pop("ESEARCH", None)
    m.untagged_responses.pop("SEARCH", None)
    typ, data = m._simple_command(*args)
    return typ, m.untagged_responses.pop("ESEARCH", []), m.untagged_responses.pop("SEARCH", [])


def main():
    host, sport, ca, user, password = sys.argv[1:6]
    ctx = ssl.create_default_context(cafile=ca)
    m = imaplib.IMAP4_SSL(host, int(sport), ssl_context=ctx)
    ok(m.login(user, password), "login")
    caps = m.capabilities
    for c in ("IMAP4REV1", "IMAP4REV2", "ESEARCH", "SEARCHRES"):
        check(c in caps, f"{c} advertised", caps)

    ok(m.select("INBOX"), "select")
    ok(m.store("2", "+FLAGS", "(\\Flagged)"), "store")

    # ESEARCH with RETURN options on a rev1 session.
    typ, es, plain = esearch(m, "SEARCH", "RETURN", "(MIN MAX COUNT ALL)", "ALL")
    check(typ == "OK", "search return", es)
    check(len(es) == 1 and es[0].endswith(b") MIN 1 MAX 3 ALL 1:3 COUNT 3"), "esearch all", es)
    check(es[0].startswith(b'(TAG "'), "esearch correlator", es)
    check(plain == [], "no SEARCH response", plain)

    typ, es, _ = esearch(m, "UID", "SEARCH", "RETURN", "(COUNT)", "FLAGGED")
    check(typ == "OK" and es and es[0].endswith(b") UID COUNT 1"), "uid esearch count", es)

    # SEARCHRES: SAVE then $.
    typ, es, _ = esearch(m, "SEARCH", "RETURN", "(SAVE)", "NOT", "FLAGGED")
    check(typ == "OK" and es == [], "SAVE alone sends no ESEARCH", es)
    data = ok(m.fetch("$", "(UID)"), "fetch $")
    check(len(data) == 2 and b"UID 1" in data[0] and b"UID 3" in data[1], "fetch $ is 1,3", data)
    typ, _, plain = esearch(m, "SEARCH", "$")
    check(typ == "OK" and plain == [b"1 3"], "search $", plain)

    # Bad syntax: BAD, the connection lives.
    try:
        m._simple_command("SEARCH", "RETURN", "(NOPE)", "ALL")
        check(False, "RETURN (NOPE) refused")
    except imaplib.IMAP4.error as e:
        check("BAD" in str(e) or "bad" in str(e).lower(), "BAD for RETURN (NOPE)", str(e))
    ok(m.noop(), "noop after BAD")

    # LIST-EXTENDED + LIST-STATUS: several patterns, STATUS after the LIST line.
    for c in ("LIST-EXTENDED", "LIST-STATUS"):
        check(c in caps, f"{c} advertised", caps)
    m.untagged_responses.pop("LIST", None)
    m.untagged_responses.pop("STATUS", None)
    typ, data = m._simple_command(
        "LIST", '""', '("INBOX" "Sen%")', "RETURN", "(SUBSCRIBED", "STATUS", "(MESSAGES))"
    )
    check(typ == "OK", "list-status", data)
    lists = m.untagged_responses.pop("LIST", [])
    status = m.untagged_responses.pop("STATUS", [])
    check(len(lists) == 2 and lists[0].endswith(b'"/" INBOX'), "LIST lines", lists)
    check(lists[1].endswith(b'"/" Sent') and b"\\Sent" in lists[1], "Sent listed", lists)
    check(status == [b"INBOX (MESSAGES 3)", b"Sent (MESSAGES 0)"], "STATUS lines", status)

    # IMAP4rev2 (ENABLE belongs to the authenticated state).
    ok(m.unselect(), "unselect")
    typ, data = m._simple_command("ENABLE", "IMAP4rev2")
    check(typ == "OK", "enable", data)
    enabled = m.untagged_responses.pop("ENABLED", [])
    check(enabled == [b"IMAP4rev2"], "ENABLED IMAP4rev2", enabled)
    ok(m.select("INBOX"), "rev2 select")
    check("RECENT" not in m.untagged_responses, "no RECENT in rev2", m.untagged_responses)
    lists = m.untagged_responses.get("LIST", [])
    check(lists == [b'() "/" INBOX'], "LIST in SELECT", lists)
    typ, es, plain = esearch(m, "SEARCH", "ALL")
    check(typ == "OK" and len(es) == 1 and es[0].endswith(b") ALL 1:3"), "rev2 SEARCH", es)
    check(plain == [], "no SEARCH in rev2", plain)

    typ, data = m.logout()
    check(typ in ("BYE", "OK"), "logout", data)
    print("imaplib ext: all checks passed")


if __name__ == "__main__":
    main()
