"""Serving many conversations: the continuous-batching engine and the OpenAI-compatible API."""
