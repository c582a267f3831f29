"""Train Keras-style GRU models in torch with Keras's exact training semantics.

``gruserve train CONFIG.yaml`` (:func:`gruserve.train.command.run_training`)
reads a YAML config (:mod:`.config`), a CSV series (:mod:`.data`), trains
with Keras's optimizers, losses and metrics (:mod:`.optimizers`,
:mod:`.losses`, :mod:`.metrics`, :mod:`.loop`) and exports the result into
the model repository with its scaling and held-out error.
"""
