"""An independent SMTP server (aiosmtpd) that stores what it receives, for relay-queue tests.

usage: sink.py OUTDIR [--tempfail-first N] [--reject ADDR]... [--tempfail-rcpt ADDR]...
              [--tls CERT KEY] [--no-smtputf8] [--size-limit N] [--auth USER:PASSWORD]

Prints "PORT <n>" once listening. Each accepted message becomes OUTDIR/<n>.eml (the bytes as
received, after dot-unstuffing) and OUTDIR/<n>.json (envelope and session facts), written
atomically so a test polling the directory never sees half a file.
"""
import argparse
import asyncio
import json
import os
import ssl

from aiosmtpd.smtp import SMTP, AuthResult, LoginPassword


class Handler:
    def __init__(self, outdir, tempfail_first, reject, tempfail_rcpt=()):
        self.outdir = outdir
        self.tempfail_left = tempfail_first
        self.reject = {a.lower() for a in reject}
        self.tempfail_rcpt = {a.lower() for a in tempfail_rcpt}
        self.seq = 0
        self.data_commands = 0

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        if address.lower() in self.reject:
            return "550 5.1.1 <%s>: no such user here" % address
        if address.lower() in self.tempfail_rcpt:
            return "451 4.2.1 <%s>: mailbox busy, try later" % address
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(rcpt_options)
        return "250 2.1.5 OK"

    async def handle_DATA(self, server, session, envelope):
        self.data_commands += 1
        if self.tempfail_left > 0:
            self.tempfail_left -= 1
            return "451 4.3.0 sink says: try again later"
        self.seq += 1
        base = os.path.join(self.outdir, "%06d" % self.seq)
        meta = {
            "mail_from": envelope.mail_from,
            "mail_options": envelope.mail_options,
            "rcpt_tos": envelope.rcpt_tos,
            "rcpt_options": envelope.rcpt_options,
            "tls": session.ssl is not None,
            "helo": session.host_name,
            "data_commands": self.data_commands,
            "auth": session.auth_data.login.decode()
            if session.authenticated and isinstance(session.auth_data, LoginPassword) else None,
        }
        for ext, data in ((".eml", envelope.original_content), (".json", json.dumps(meta).encode())):
            with open(base + ext + ".tmp", "wb") as f:
                f.write(data)
            os.rename(base + ext + ".tmp", base + ext)
        return "250 2.0.0 OK queued as %d" % self.seq


async def main():
    p = argparse.ArgumentParser()
    p.add_argument("outdir")
    p.add_argument("--tempfail-first", type=int, default=0)
    p.add_argument("--reject", action="append", default=[])
    p.add_argument("--tls", nargs=2, metavar=("CERT", "KEY"))
    p.add_argument("--no-smtputf8", action="store_true")
    p.add_argument("--tempfail-rcpt", action="append", default=[])
    p.add_argument("--size-limit", type=int, default=33554432)
    p.add_argument("--auth", metavar="USER:PASSWORD")
    a = p.parse_args()
    ctx = None
    if a.tls:
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(a.tls[0], a.tls[1])
    handler = Handler(a.outdir, a.tempfail_first, a.reject, a.tempfail_rcpt)
    extra = {}
    if a.auth:
        user, password = a.auth.split(":", 1)

        def authenticator(server, session, envelope, mechanism, auth_data):
            ok = (isinstance(auth_data, LoginPassword) and auth_data.login == user.encode()
                  and auth_data.password == password.encode())
            return AuthResult(success=ok, auth_data=auth_data if ok else None)

        extra = dict(authenticator=authenticator, auth_required=True, auth_require_tls=True)
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: SMTP(handler, hostname="sink.test", enable_SMTPUTF8=not a.no_smtputf8,
                     decode_data=False, tls_context=ctx, require_starttls=False,
                     data_size_limit=a.size_limit, **extra),
        "127.0.0.1", 0)
    print("PORT %d" % server.sockets[0].getsockname()[1], flush=True)
    # The test kills us when it is done.
    await server.serve_forever()


asyncio.run(main())
