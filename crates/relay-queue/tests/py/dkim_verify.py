"""Verify every DKIM-Signature of a received message with dkimpy, answering the DNS TXT query
for <selector>._domainkey.<domain> from the records given on the command line.

usage: dkim_verify.py MESSAGE_FILE EXPECTED_DOMAIN SELECTOR=TXT...
Exits 0 and prints "verified N" when all N (>= 1) signatures verify for EXPECTED_DOMAIN.
"""
import sys

import dkim

msg = open(sys.argv[1], "rb").read()
domain = sys.argv[2].encode()
records = {}
for arg in sys.argv[3:]:
    sel, txt = arg.split("=", 1)
    records[("%s._domainkey.%s." % (sel, sys.argv[2])).encode()] = txt.encode()


def dnsfunc(name, timeout=5):
    if not name.endswith(b"."):
        name += b"."
    return records.get(name)


d = dkim.DKIM(msg)
n = sum(1 for (k, _) in d.headers if k.lower() == b"dkim-signature")
if n == 0:
    print("no DKIM-Signature")
    sys.exit(1)
for i in range(n):
    if not d.verify(idx=i, dnsfunc=dnsfunc):
        print("signature %d failed: %r" % (i, d.signature_fields))
        sys.exit(1)
    if d.domain != domain:
        print("signed by %r, expected %r" % (d.domain, domain))
        sys.exit(1)
print("verified %d" % n)
