"""An OpenAI-compatible HTTP API in front of the Gemma model on Triton (docs/gateway.md).

    python -m gateway --port 9000          # GEMMA_TRITON_URL=localhost:8001 by default

A request's path: app.py (routes, API key, body limit) -> schemas.py (the OpenAI request, checked)
-> structured.py / tools.py (the constraint `response_format` or `tool_choice` asks for; the tools'
prompt) -> prompts.py (text prompts; chat messages, tool calls and results in Gemma's turn format)
-> sampling.py (one Triton request per choice, seeds derived per choice) -> choices.py (the
choices' gRPC streams, read concurrently with gemma_client's AsyncGemmaClient) -> responses.py
(OpenAI bodies and stream chunks; tool calls parsed by tools.py) -> sse.py (server-sent events; a
client that goes away cancels the Triton requests).
errors.py turns every failure into OpenAI's error shape. No torch here: only HTTP and gRPC.
"""
