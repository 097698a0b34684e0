"""OpenAI-compatible HTTP server over TurboMind (`python -m lmdeploy.serve.openai.api_server`)."""
