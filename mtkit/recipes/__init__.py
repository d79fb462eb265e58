"""Recipes: one YAML file that takes a named corpus to a scored, averaged model, through six
stages, each a small function over a run context::

    prepare -> preprocess -> train -> average -> translate -> score

The modules, bottom up: ``schema`` (the recipe's keys, validation), ``smoke`` (the ``--smoke``
variant), ``load`` (finding, loading, listing recipes), ``context`` (the run context, stage
markers), ``stages`` (the six stages, the generated text of smoke runs; the score stage hands plain
data to :mod:`mtkit.report`) and ``runner`` (the resumable stage loop)."""
