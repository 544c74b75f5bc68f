"""The command line (`medusa-engine`) and the OpenAI-compatible HTTP server."""
