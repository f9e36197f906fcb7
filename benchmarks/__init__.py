"""The keras_fastpredict benchmark suite: ``python -m benchmarks --help``.

models.py builds the models, cases.py holds the loop shapes and their variants,
report.py times them and writes the table, target lines and plots.
"""
