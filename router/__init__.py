"""pdserve.v1.Router: the public gRPC server in front of the prefill and decode pools.

    server = RouterServer(RouterConfig(vocab_size=..., context_len=...), tokenizer)
    await server.start()            # server.address (public), server.internal_address (Registry)
    ...
    await server.stop(grace=1.0)

Modules: config (RouterConfig), server (lifecycle, health, reflection), service (gRPC handlers),
wire (request parsing: bad UTF-8 -> INVALID_ARGUMENT), validate (checks, defaults, tokenization),
tokenizer (TextCodec), admission, registry (heartbeats, expiry), picker (prefill / decode / local
prefill picks, prefix hashes = the engine's), flow (run_request: admit, then the plain path or
streaming's), request_run (RequestRun: one request's lease, deadline, clock and stream; prefill ->
first token -> decode, retries, migration, ReleaseKV), streaming (the streamed KV path), calls
(bounded worker calls, failures), output (text, stop strings through engine.stop, finish reasons,
usage), errors, security (API keys, TLS), status (GetStatus, table/JSON), client (blocking helpers
for the CLI); the OpenAI HTTP door on `http_port`: http_server (aiohttp on the same loop, entering
flow.run_request), openai_request / openai_response (JSON and SSE <-> GenerateRequest /
GenerateResponse), chat_template (Jinja2, as transformers renders it).
"""
