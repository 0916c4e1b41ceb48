"""The OpenAI-compatible server: media policy, batching worker, HTTP API, chat page."""
