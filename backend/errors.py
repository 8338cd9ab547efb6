"""The two ways the engine refuses a request, so callers can map each to a transport status."""


class InvalidRequestError(ValueError):
    """The request itself is wrong (bad parameter, empty or too long prompt); the message names why."""


class EngineOverloadedError(RuntimeError):
    """The request is fine but the engine's waiting queue is full; retrying later may succeed."""
