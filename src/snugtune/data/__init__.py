"""The data path: files.py and hub.py read rows, columns.py maps their names, detect.py tells the format,
format_registry.py lists the formats (each read by a module of formats/), normalize.py makes rows samples through
it and turns.py reads each turn, templates.py picks and renders the chat template, tokenize.py masks what is
trained, prepare.py runs them all (prep_report.py says what it did), batches.py packs the samples."""
