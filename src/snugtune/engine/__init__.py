"""The training engine: our own loop (train.py) and the policies it is handed."""
