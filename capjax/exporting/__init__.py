"""A trained workdir as one graph that runs without capjax: ONNX or SavedModel.

  artifact = exporting.export_workdir(workdir, out, fmt='onnx', beam_size=3)

The graph goes from resized pixels through the feature extractor, the
encoder and the whole search loop to token ids, lengths, log-probabilities
and attention weights; `capjax.export` is the program around it.
"""
