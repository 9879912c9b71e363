"""An independent SMTP server (aiosmtpd) for mailbench's interop test.

Listens on 127.0.0.1 on a free port and prints it; every message is kept in memory. When
standard input closes it prints one JSON line {"messages": [...], "rcpts": [...]} and exits.
Refuses RCPT for addresses containing "reject" with 550, like a real server with unknown users.
"""

import asyncio
import json
import socket
import sys

from aiosmtpd.smtp import SMTP


class Sink:
    def __init__(self):
        self.messages = []
        self.rcpts = []

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        if "reject" in address:
            return "550 5.1.1 no such user"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server, session, envelope):
        self.messages.append(envelope.content.decode("utf-8", "replace"))
        self.rcpts.extend(envelope.rcpt_tos)
        return "250 2.0.0 OK"


async def main():
    sink = Sink()
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: SMTP(sink, hostname="sink.test"), sock=sock)
    print(sock.getsockname()[1], flush=True)
    # Run until the test closes our stdin (bounded by the test's own timeout).
    await loop.run_in_executor(None, sys.stdin.read)
    server.close()
    ids = []
    for m in sink.messages:
        for line in m.splitlines():
            if line.lower().startswith("message-id:"):
                ids.append(line.split(":", 1)[1].strip())
                break
    print(json.dumps({"messages": ids, "sizes": [len(m) for m in sink.messages], "rcpts": sink.rcpts}), flush=True)


asyncio.run(main())
