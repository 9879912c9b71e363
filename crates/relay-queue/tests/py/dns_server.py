"""A tiny authoritative DNS server (dnslib) for relay-queue routing tests.

usage: dns_server.py ZONEFILE
Prints "PORT <n>" once listening on 127.0.0.1 (UDP and TCP). Names in the zone answer with
their records of the asked type (NODATA when the name exists with other types only); other
names get NXDOMAIN.
"""
import sys
import time

from dnslib import QTYPE, RCODE, RR
from dnslib.server import BaseResolver, DNSLogger, DNSServer


class Zone(BaseResolver):
    def __init__(self, text):
        self.rrs = RR.fromZone(text)

    def resolve(self, request, handler):
        reply = request.reply()
        qname = str(request.q.qname).lower()
        exists = False
        for rr in self.rrs:
            if str(rr.rname).lower() == qname:
                exists = True
                if rr.rtype == request.q.qtype:
                    reply.add_answer(rr)
        if not exists:
            reply.header.rcode = RCODE.NXDOMAIN
        return reply


zone = Zone(open(sys.argv[1]).read())
quiet = DNSLogger(log="-request,-reply,-truncated,-error,-recv,-send,-data")
# The kernel picks a free UDP port; the same TCP port may be taken by another test's socket,
# so pick again until both bind (a CI run once failed on exactly that).
for attempt in range(100):
    udp = DNSServer(zone, port=0, address="127.0.0.1", logger=quiet)
    port = udp.server.server_address[1]
    try:
        tcp = DNSServer(zone, port=port, address="127.0.0.1", tcp=True, logger=quiet)
        break
    except OSError:
        udp.server.server_close()
else:
    sys.exit("no port free for both UDP and TCP")
udp.start_thread()
tcp.start_thread()
print("PORT %d" % port, flush=True)
while True:
    time.sleep(3600)
