"""Check that a message is an RFC 3464 delivery status notification, with Python's email
package (an independent MIME parser).

usage: dsn_check.py MESSAGE_FILE RECIPIENT ACTION STATUS ORIGINAL_SUBJECT
"""
import email
import email.policy
import sys

path, rcpt, action, status, subject = sys.argv[1:6]
msg = email.message_from_bytes(open(path, "rb").read(), policy=email.policy.compat32)
fail = lambda why: (print(why), sys.exit(1))

if msg.get_content_type() != "multipart/report":
    fail("content type %s" % msg.get_content_type())
if msg.get_param("report-type") != "delivery-status":
    fail("report-type %s" % msg.get_param("report-type"))
parts = msg.get_payload()
if len(parts) < 2:
    fail("only %d parts" % len(parts))
if parts[0].get_content_type() != "text/plain":
    fail("first part %s" % parts[0].get_content_type())
ds = parts[1]
if ds.get_content_type() != "message/delivery-status":
    fail("second part %s" % ds.get_content_type())
# compat32 parses message/delivery-status into a list of header blocks: the per-message
# fields, then one block per recipient.
blocks = ds.get_payload()
per_message = blocks[0]
if not per_message.get("Reporting-MTA", "").startswith("dns;"):
    fail("Reporting-MTA %r" % per_message.get("Reporting-MTA"))
found = None
for b in blocks[1:]:
    if b.get("Final-Recipient", "").replace(" ", "").lower() == ("rfc822;" + rcpt).lower():
        found = b
if found is None:
    fail("no block for %s in %r" % (rcpt, [dict(b) for b in blocks]))
if found.get("Action") != action:
    fail("Action %r" % found.get("Action"))
if found.get("Status") != status:
    fail("Status %r" % found.get("Status"))
if len(parts) >= 3:
    orig = parts[2]
    if orig.get_content_type() == "message/rfc822":
        inner = orig.get_payload()[0]
        if inner.get("Subject") != subject:
            fail("original subject %r" % inner.get("Subject"))
    elif orig.get_content_type() != "text/rfc822-headers":
        fail("third part %s" % orig.get_content_type())
print("dsn ok: %d recipient block(s)" % (len(blocks) - 1))
