"""Evaluation of a finished run folder: tasks.py runs the tasks, run.py loads the run, humaneval.py and
sandbox.py execute generated code, report.py builds the results table."""
