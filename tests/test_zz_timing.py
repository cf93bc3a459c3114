import time
from tests.setup_fixtures import *  # noqa

async def test_timing(bed):
    async with bed.services.remote.pool.connection(bed.services.remote.target(bed.server)) as conn:
        for cmd in ["true", "exit 0", "echo hi"]:
            t=time.monotonic()
            for _ in range(5):
                await conn.run(cmd)
            print(cmd, (time.monotonic()-t)/5)
        t=time.monotonic()
        for _ in range(5):
            await conn.run("true", stdin=asyncssh_devnull) if False else await conn.run("true", input="")
        print("input", (time.monotonic()-t)/5)
