"""The inference engine: llama.cpp through its C API, sampling, MTP speculation and the request scheduler.

Everything that calls into llama.cpp for generation lives here; the LocalAI gRPC service (`backend.service`)
and the OpenAI HTTP front (`backend.api`) only translate requests into `GenerationRequest`s and chunks back.
"""
