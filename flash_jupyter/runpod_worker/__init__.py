"""Runpod serverless worker files as endpoints: a file that calls
``runpod.serverless.start({"handler": handler, ...})`` deploys unchanged.

- ``static``: recognise such a file by reading it (never running it): where it calls
  ``start``, its handler, ``return_aggregate_stream``, the most jobs ``concurrency_modifier``
  lets one worker run, the ``requirements.txt`` beside it, an example input.
- ``handler``: on the worker, the job handler. It runs the file with the real ``runpod``
  package, takes the config the file passes to ``runpod.serverless.start`` instead of
  starting Runpod's worker loop, and runs each job ``{"id", "input"}`` with Runpod's own job
  code (``rp_job.run_job``, ``run_job_generator``, ``rp_handler.is_generator``).
"""
