"""The data path: files.py and hub.py read rows, columns.py maps their names, detect.py tells the format,
formats.py and turns.py normalize rows into conversations or documents, templates.py picks and renders the
chat template, tokenize.py masks what is trained, prepare.py runs them all, batches.py packs the samples."""
