"""Recipes: one YAML file that takes a named corpus to a scored, averaged model.

A run chains six stages, each a small function over a run context::

    prepare -> preprocess -> train -> average -> translate -> score

The modules, from the bottom up: ``schema`` (the recipe's keys and their validation), ``smoke``
(the ``--smoke`` variant), ``load`` (finding, loading and listing recipes), ``toy`` (generated
text for smoke runs), ``context`` (the run's context and stage markers), ``stages`` (the six
stages; the score stage hands plain data to :mod:`mtkit.report`) and ``runner`` (the resumable
stage loop).
"""
