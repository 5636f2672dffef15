"""Dictionary features as units: a layer's activations read in another basis.

A *dictionary* is an ``nn.Module`` that maps a layer's output to F feature activations in
the same layout, with F features in place of the C channels, applied at every position:

- conv ``[B, C, h, w] -> [B, F, h, w]`` (one channel vector per spatial position);
- linear ``[B, C] -> [B, F]``;
- transformer tokens ``[B, T, C] -> [B, T, F]`` (every token, prefix tokens included).

The package's parts, one job each:

- :mod:`.kinds`: the dictionaries themselves (:class:`~.kinds.Directions`,
  :class:`~.kinds.NMFDictionary`, :class:`~.kinds.SparseAutoencoder`), their checks and
  identity;
- :mod:`.fit`: fitting one on a layer's activations (:func:`~.fit.sample_positions`,
  :func:`~.fit.fit_dictionary`, :func:`~.fit.train_sae`);
- :mod:`.files`: dnd's own file and the layouts of other tools (SAELens,
  dictionary_learning, plain safetensors, matrices of directions);
- :mod:`.attach`: hanging a dictionary under its layer of a target, and a run's configured
  dictionaries (fitted and saved on a first run, read back after).
"""
