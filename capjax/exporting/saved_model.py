"""The captioning function as a TensorFlow SavedModel, by jax2tf.

jax2tf's native serialization embeds the function's StableHLO (the JAX
program itself, with a symbolic batch size) in an XlaCallModule op, so the
SavedModel runs what capjax runs. Two signatures:

- 'serving_default': encoded images (JPEG, PNG, ...) -> captions. Images
  are decoded and resized in the graph, so TensorFlow Serving answers
  `{"instances": [{"b64": ...}]}` as it is. TensorFlow's decoders do not
  apply EXIF orientation nor composite transparency onto white as capjax
  does; for those images, send pixels.
- 'pixels': resized pixels (capjax_export.json's preprocessing) -> captions.

Both return the four arrays of the ONNX graph and `caption`, the words.
"""

from collections.abc import Callable
import pathlib

from capjax.data import vocab as vocab_lib
from capjax.exporting import graph

BYTES = 'image_bytes'  # TF Serving decodes base64 for inputs named *_bytes
CAPTION = 'caption'
PIXELS_SIGNATURE = 'pixels'


def describe_signatures(image_size: int | None) -> dict:
  """The signatures, for capjax_export.json."""
  outputs = [*graph.OUTPUTS, CAPTION]
  if image_size is None:
    return {'serving_default': {'inputs': [graph.FEATURES], 'outputs': outputs}}
  return {
    'serving_default': {'inputs': [BYTES], 'outputs': outputs},
    PIXELS_SIGNATURE: {'inputs': [graph.PIXELS], 'outputs': outputs},
  }


def _words(tokens_BT, words_V):
  """The caption of each row, as Vocab.decode spells it."""
  import tensorflow as tf  # noqa: PLC0415

  special = (vocab_lib.Vocab.pad_id, vocab_lib.Vocab.start_id)
  # Search writes <pad> after <end>: every id past <end> is dropped too.
  keep_BT = tf.reduce_all(
    tf.stack([tokens_BT != i for i in special]), axis=0
  ) & (tokens_BT != vocab_lib.Vocab.end_id)
  words_BT = tf.ragged.boolean_mask(tf.gather(words_V, tokens_BT), keep_BT)
  return tf.strings.reduce_join(words_BT, axis=1, separator=' ')


def save(
  fn: Callable,
  item_shape: tuple[int, ...],
  directory: pathlib.Path,
  *,
  vocab: vocab_lib.Vocab,
  input_name: str,
  image_size: int | None,
) -> pathlib.Path:
  """Writes the SavedModel of `fn` into `directory`; returns saved_model.pb."""
  # TensorFlow only here: ONNX export and the rest of capjax run without it.
  import tensorflow as tf  # noqa: PLC0415
  from jax.experimental import jax2tf  # noqa: PLC0415

  fn_tf = jax2tf.convert(
    fn, polymorphic_shapes=['(b, ...)'], with_gradient=False
  )
  module = tf.Module()
  module.words = tf.constant(vocab.words)

  def results(x):
    arrays = fn_tf(x)
    named = dict(zip(graph.OUTPUTS, arrays))
    named[CAPTION] = _words(named['tokens'], module.words)
    return named

  spec = tf.TensorSpec([None, *item_shape], tf.float32, name=input_name)
  from_input = tf.function(results, input_signature=[spec])
  signatures = {}
  if image_size is None:
    signatures['serving_default'] = from_input
  else:

    def decode(data):
      image = tf.io.decode_image(data, channels=3, expand_animations=False)
      return tf.image.resize(image, (image_size, image_size))

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name=BYTES)])
    def from_bytes(image_bytes):
      pixels = tf.map_fn(
        decode,
        image_bytes,
        fn_output_signature=tf.TensorSpec(item_shape, tf.float32),
      )
      return results(pixels)

    signatures['serving_default'] = from_bytes
    signatures[PIXELS_SIGNATURE] = from_input
  module.from_input = from_input
  tf.saved_model.save(module, str(directory), signatures=signatures)
  return directory / 'saved_model.pb'
