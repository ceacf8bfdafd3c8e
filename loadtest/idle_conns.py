#!/usr/bin/env python3
"""Open COUNT keep-alive connections to 127.0.0.1:PORT, send one request on
each, keep them open and idle, then print the resident memory of process
PID (and its children) as JSON. Usage: idle_conns.py PORT COUNT PID"""
import asyncio
import json
import resource
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import rss_kib  # noqa: E402  (the harness's own process-tree RSS)

PORT, COUNT, PID = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])


async def one():
    reader, writer = await asyncio.open_connection("127.0.0.1", PORT)
    writer.write(b"GET / HTTP/1.1\r\nHost: bench.local\r\n\r\n")
    await writer.drain()
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    length = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":")[1])
    await asyncio.wait_for(reader.readexactly(length), 10)
    return writer


async def main():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    writers = []
    for start in range(0, COUNT, 500):
        batch = await asyncio.gather(*(one() for _ in range(min(500, COUNT - start))), return_exceptions=True)
        writers += [w for w in batch if not isinstance(w, BaseException)]
    await asyncio.sleep(2)
    print(json.dumps({"open": len(writers), "rss_kib": rss_kib(PID)}))
    for w in writers:
        w.close()


asyncio.run(main())
