"""The engine: one compiled session callable per model, and the ways calls reach it.

``compiled`` (the callable and its cache), ``route`` (which way a call takes),
``readahead``, ``deferred``, ``merge`` (many calls in one run, each getting its own rows
or error), ``batch_safety`` and ``verification`` (may rows share a run?),
``inference_graph`` (recurrent layers unrolled), ``hooks`` (settle pending work before
the graph is used). Adapters (``keras_fastpredict.adapters``) bring calls here; nothing
in the engine knows a Keras flavour.
"""
