"""Serving many conversations: the continuous-batching engine (its front-ends, the web page and the
OpenAI-compatible API, are in minigpt4/frontends/)."""
