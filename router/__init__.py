"""pdserve.v1.Router: the public gRPC server in front of the prefill and decode pools.

    server = RouterServer(RouterConfig(vocab_size=..., context_len=...), tokenizer)
    await server.start()            # server.address (public), server.internal_address (Registry)
    ...
    await server.stop(grace=1.0)

Modules: config (RouterConfig), server (lifecycle, health, reflection), service (gRPC handlers),
wire (request parsing: bad UTF-8 -> INVALID_ARGUMENT), validate (checks, defaults, tokenization),
admission, registry (heartbeats, expiry), picker (+ prefix: block hashes = the engine's), flow (one
request: prefill -> first token -> decode -> stream, cancel/deadline, ReleaseKV), output + detok
(text, stop strings, finish reasons, usage), errors, security (API keys, TLS), status (GetStatus,
table/JSON), client (blocking helpers for the CLI); the OpenAI HTTP door on `http_port`: http_server
(aiohttp on the same loop, entering flow.run_request), openai_request / openai_response (JSON and
SSE <-> GenerateRequest / GenerateResponse), chat_template (Jinja2, as transformers renders it).
"""
