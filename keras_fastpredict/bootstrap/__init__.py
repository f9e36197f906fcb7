"""The bootstrap directory: the runner puts this folder first on ``PYTHONPATH`` so that
every Python process the job starts runs its ``sitecustomize`` (see that module and
``keras_fastpredict.processes``). Nothing else may live here: whatever this folder
holds can be imported by name in every child process.
"""
