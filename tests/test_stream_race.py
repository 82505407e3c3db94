"""A streamed reply ends with every piece of text the generation thread produced: pieces reach
the event loop as scheduled callbacks, and the reply's done flag can be seen before they ran."""

import asyncio
import json
import threading
import time
from types import SimpleNamespace

from instill.infer.engine import GenParams, Job
from instill.serve.app import _stream


def test_the_last_pieces_are_streamed_even_when_done_is_seen_first():
    job = Job(prompt=[1], params=GenParams(max_new_tokens=4))

    def submit(job):
        # the generation thread sends its last pieces and finishes while the event loop is
        # busy (here: blocked in this call), so the pieces are still queued callbacks when the
        # stream next looks at the done flag
        def work():
            job.on_text("Hello, ")
            job.on_text("world")
            job.text, job.finish_reason = "Hello, world", "length"
            job.done.set()

        worker = threading.Thread(target=work)
        worker.start()
        worker.join()
        time.sleep(0.01)

    server = SimpleNamespace(scheduler=SimpleNamespace(submit=submit), release=lambda: None)

    async def read():
        response = _stream(server, job, "m", chat=True, include_usage=False)
        return [part async for part in response.body_iterator]

    events = asyncio.run(read())
    bodies = [json.loads(e[len("data: ") :]) for e in events if e.startswith("data: {")]
    text = "".join(b["choices"][0]["delta"].get("content") or "" for b in bodies)
    assert text == "Hello, world"
    assert bodies[-1]["choices"][0]["finish_reason"] == "length"
