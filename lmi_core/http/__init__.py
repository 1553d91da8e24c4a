"""The HTTP layer: native LMI API, OpenAI API, management API, /ping and /metrics."""
