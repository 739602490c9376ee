"""``strataprune serve``: an OpenAI-compatible HTTP server for a deployed model, with continuous batching (docs/serve.md).

One concept per module: ``protocol`` (request checks, the error shape), ``sampling``, ``kvcache`` (the
padded batch cache), ``runners`` (batched or one at a time), ``scheduler`` (continuous batching),
``metrics`` (Prometheus), ``api`` (routes), ``page`` (the HTML page), ``model`` (the served folder),
``server`` (uvicorn, signals), ``ray_app`` (replicas as a Ray Serve deployment, ``--ray``). Needs the ``serve``
extra: ``pip install 'strataprune[serve]'`` (``ray-serve`` for ``--ray``).
"""
