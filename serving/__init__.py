"""The Triton side of the server: what model_repository/gemma/1/model.py needs besides the engine.

`requests` turns a request's tensors into the engine's (prompt, SamplingParams) by the wire contract
(gemma_protocol); `logprobs` writes the `logprobs` output's JSON; `metrics` is the model's Prometheus metrics through Triton's API. The engine
(backend/) imports nothing from here, from gemma_protocol or from Triton.
"""
