"""The language model under test: loading a Hugging Face causal LM (`loading`), the embedded SmolLM2 shipped as a
GGUF (`embedded`), and what the runtime needs to know about an architecture (`model_info`).

Imports only the lower layer (errors); the runtime, training and evaluation wings build on it.
"""
