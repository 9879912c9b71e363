#!/usr/bin/env python3
"""A remote domain's MX for the compose end-to-end test: accepts every message over plain SMTP
and writes it to /sink/<n>.eml, so the test can read what relay-queue delivered. Standard
library only (asyncio); no STARTTLS, no AUTH: a stand-in for someone else's server."""
import asyncio
import itertools
import os

OUT = os.environ.get("SINK_DIR", "/sink")
counter = itertools.count(1)


async def session(reader, writer):
    def reply(line):
        writer.write((line + "\r\n").encode())

    reply("220 sink.remote.test ESMTP sink")
    rcpts, data_mode, lines = [], False, []
    try:
        while True:
            raw = await asyncio.wait_for(reader.readline(), 300)
            if not raw:
                break
            if data_mode:
                if raw in (b".\r\n", b".\n"):
                    n = next(counter)
                    tmp = os.path.join(OUT, f".{n}.tmp")
                    with open(tmp, "wb") as f:
                        f.write(b"".join(lines))
                    os.rename(tmp, os.path.join(OUT, f"{n}.eml"))
                    reply(f"250 2.0.0 stored as {n}")
                    data_mode, lines, rcpts = False, [], []
                else:
                    lines.append(raw[1:] if raw.startswith(b"..") else raw)
                await writer.drain()
                continue
            cmd = raw.decode("latin-1").strip()
            verb = cmd.split(" ", 1)[0].upper()
            if verb in ("EHLO", "HELO"):
                reply("250-sink.remote.test\r\n250-8BITMIME\r\n250 SMTPUTF8")
            elif verb == "MAIL":
                rcpts = []
                reply("250 2.1.0 ok")
            elif verb == "RCPT":
                rcpts.append(cmd)
                reply("250 2.1.5 ok")
            elif verb == "DATA":
                if rcpts:
                    data_mode = True
                    reply("354 go ahead")
                else:
                    reply("503 5.5.1 no recipients")
            elif verb in ("RSET", "NOOP"):
                reply("250 2.0.0 ok")
            elif verb == "QUIT":
                reply("221 2.0.0 bye")
                await writer.drain()
                break
            else:
                reply("502 5.5.2 not here")
            await writer.drain()
    except (asyncio.TimeoutError, ConnectionError):
        pass
    finally:
        writer.close()


async def main():
    os.makedirs(OUT, exist_ok=True)
    server = await asyncio.start_server(session, "0.0.0.0", 25)
    async with server:
        await server.serve_forever()


asyncio.run(main())
