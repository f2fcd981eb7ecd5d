"""Serving: a continuous-batching engine (:mod:`.engine`), the engine on a background thread for asyncio
(:mod:`.async_engine`) and an OpenAI-compatible HTTP server (:mod:`.server`, needs ``fastapi`` and ``uvicorn``).

The engine imports no HTTP code; ``python -m gptkernels.serve`` starts the server, and
``python -m gptkernels.serving.bench`` measures its throughput.
"""

from .engine import Engine, Output, SamplingParams, TokenLogprob

__all__ = ["Engine", "Output", "SamplingParams", "TokenLogprob"]
