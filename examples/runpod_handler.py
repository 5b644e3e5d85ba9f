"""A Runpod serverless worker file, written as Runpod's docs write one. It runs unchanged on
Runpod (``python -u runpod_handler.py`` in its container) and as a flash-jupyter endpoint:

    flash-jupyter deploy examples/runpod_handler.py
    eval "$(flash-jupyter env)"
    curl -s -H "Authorization: Bearer $FLASH_JUPYTER_TOKEN" \\
         -d '{"input": {"text": "to be or not to be", "delay": 0.5}}' \\
         $FLASH_JUPYTER_URL/v2/runpod_handler/run                       # {"id": ..., ...}
    curl -s -H "Authorization: Bearer $FLASH_JUPYTER_TOKEN" \\
         $FLASH_JUPYTER_URL/v2/runpod_handler/stream/<id>               # the words so far
    curl -s -H "Authorization: Bearer $FLASH_JUPYTER_TOKEN" \\
         $FLASH_JUPYTER_URL/v2/runpod_handler/status/<id>               # "output": "3/6 words"

The handler streams one chunk per word, reports its progress with
``runpod.serverless.progress_update`` (the running job's ``output`` on ``/status``), and returns
every chunk as the output (``return_aggregate_stream``). ``concurrency_modifier`` lets a worker
run 4 jobs at once (deploy reads the 4: the endpoint's ``max_concurrency``). It needs the
``runpod`` package (a requirements.txt beside a real worker file lists it); see docs/app.md,
"Runpod worker files".
"""

import asyncio

import runpod


async def handler(job):
    job_input = job["input"]
    words = str(job_input.get("text", "hello world")).split()
    delay = float(job_input.get("delay", 0.0))
    for i, word in enumerate(words, 1):
        await asyncio.sleep(delay)  # the work a real handler does per token
        runpod.serverless.progress_update(job, f"{i}/{len(words)} words")
        yield {"word": word, "index": i}


def concurrency_modifier(current_concurrency):
    return 4


if __name__ == "__main__":
    runpod.serverless.start(
        {
            "handler": handler,
            "return_aggregate_stream": True,
            "concurrency_modifier": concurrency_modifier,
        }
    )
