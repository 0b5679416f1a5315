"""The recall service: ``python -m mind serve --model FOLDER`` serves an export folder over HTTP.

Modules: :mod:`.app` (the Starlette app, its routes, hot swap and the admin guard; ``serve`` runs it
under uvicorn), :mod:`.batcher` (dynamic batching into one Recommender call), :mod:`.models` (request
schemas and their one-line refusals), :mod:`.reload` (a loaded export, its model id, the swap checks),
:mod:`.metrics` (Prometheus text) and :mod:`.page` (``GET /``).  Retrieval itself is
``mind.serve.Recommender``'s; nothing here ranks items.  Needs the ``[serve]`` extra (starlette,
uvicorn, prometheus-client).  docs/serving.md describes the service; docs/results/service.md has
its measured latency and throughput.
"""

from .app import ServiceConfig, create_app, serve, start_in_thread
from .models import Limits

__all__ = ["Limits", "ServiceConfig", "create_app", "serve", "start_in_thread"]
