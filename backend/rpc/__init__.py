"""Splitting a model across hosts with llama.cpp's own RPC backend (ggml-rpc).

- `protocol`: the wire framing of ggml-rpc as this llama.cpp speaks it, a direct probe of a worker (version,
  devices, memory) and the well-formed replies the guard gives once a worker is gone.
- `guard`: an in-process relay between llama.cpp's RPC client and each worker. llama.cpp aborts the process
  when a worker connection fails (`RPC_STATUS_ASSERT` -> `GGML_ABORT`), so it never talks to a worker directly.
- `client`: what the engine uses: register the workers, their devices for `llama_model_params.devices`, the
  split, and the check that turns a lost worker into `WorkerLostError`.
- `worker`: `apexmtp worker`, the RPC server exposing this host's devices.

The ggml binding (`backend.core.ggml`) and worker addresses (`backend.core.endpoints`) are on the ground floor;
this package imports nothing else of ours, so the engine, which loads split models through `client`, sits above it.
"""
