"""Base models: what a `model:` string names and the local folder it becomes (resolve), the embedded default
(embedded), GGUF files converted to HF folders (gguf_convert), random-weight models of a registry shape
(shapes), the cache they live in (cache), and loading a base for a method with LoRA attached (load)."""
