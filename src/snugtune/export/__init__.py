"""Export: merged 16-bit HF folders (merge.py), GGUF files (gguf_file.py)."""
