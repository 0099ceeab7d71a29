"""`snugtune bench`: compare.py runs each stack in its own process and builds the table; plain.py is the
plain transformers + peft + bitsandbytes recipe, unsloth_stack.py Unsloth as its users run it."""
