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

from collections.abc import Callable, Iterator
import contextlib
import pathlib

from capjax.data import vocab as vocab_lib
from capjax.exporting import graph

BYTES = 'image_bytes'  # TF Serving decodes base64 for inputs named *_bytes
CAPTION = 'caption'
PIXELS_SIGNATURE = 'pixels'


@contextlib.contextmanager
def _stablehlo_for_tensorflow() -> Iterator[None]:
  """JAX's programs serialized for TensorFlow's older StableHLO.

  jax.export writes StableHLO at least 4 weeks old; TensorFlow's
  XlaCallModule lags further behind (TF 2.21 reads up to 1.13.7, JAX 0.10
  writes 1.15) and refuses newer ops. 12 weeks old fits. jax.export has no
  option for it, hence the patch of its private serializer while saving.
  """
  from jax._src.export import _export  # noqa: PLC0415

  original = _export._module_to_bytecode  # noqa: SLF001
  hlo = _export.hlo

  def to_bytecode(module):
    target = hlo.get_version_from_compatibility_requirement(
      hlo.StablehloCompatibilityRequirement.WEEK_12
    )
    return _export._jax.mlir.serialize_portable_artifact(  # noqa: SLF001
      module, target, _export.xb.get_backend().serialize_with_sdy
    )

  _export._module_to_bytecode = to_bytecode  # noqa: SLF001
  try:
    yield
  finally:
    _export._module_to_bytecode = original  # noqa: SLF001


def _per_image(fn: Callable, item_shape: tuple[int, ...]) -> Callable:
  """fn converted for a batch of one, mapped over a batch by tf.map_fn."""
  import jax  # noqa: PLC0415
  from jax.experimental import jax2tf  # noqa: PLC0415
  import tensorflow as tf  # noqa: PLC0415

  one = jax.ShapeDtypeStruct((1, *item_shape), jax.numpy.float32)
  signature = tuple(
    tf.TensorSpec(a.shape[1:], a.dtype.name) for a in jax.eval_shape(fn, one)
  )
  fn_tf = jax2tf.convert(fn, with_gradient=False)

  def one_image(x):
    return tuple(a[0] for a in fn_tf(x[None]))

  return lambda x: tf.map_fn(one_image, x, fn_output_signature=signature)


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
  per_image: bool,
) -> pathlib.Path:
  """Writes the SavedModel of `fn` into `directory`; returns saved_model.pb.

  per_image: convert for one image and map it over the batch in TensorFlow.
  Beam search needs it: with a symbolic batch size, its top_k lowers to a
  sort of dynamic shape that TensorFlow cannot compile.
  """
  # TensorFlow only here: ONNX export and the rest of capjax run without it.
  from jax.experimental import jax2tf  # noqa: PLC0415
  import tensorflow as tf  # noqa: PLC0415

  if per_image:
    arrays_fn = _per_image(fn, item_shape)
  else:
    arrays_fn = jax2tf.convert(
      fn, polymorphic_shapes=['(b, ...)'], with_gradient=False
    )
  module = tf.Module()
  module.words = tf.constant(vocab.words)

  def results(x):
    arrays = arrays_fn(x)
    named = dict(zip(graph.OUTPUTS, arrays))
    named[CAPTION] = _words(named['tokens'], module.words)
    return named

  spec = tf.TensorSpec([None, *item_shape], tf.float32, name=input_name)
  from_input = tf.function(results, input_signature=[spec], autograph=False)
  signatures = {}
  if image_size is None:
    signatures['serving_default'] = from_input
  else:

    def decode(data):
      image = tf.io.decode_image(data, channels=3, expand_animations=False)
      return tf.image.resize(image, (image_size, image_size))

    @tf.function(
      input_signature=[tf.TensorSpec([None], tf.string, name=BYTES)],
      autograph=False,
    )
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
  with _stablehlo_for_tensorflow():
    tf.saved_model.save(module, str(directory), signatures=signatures)
  return directory / 'saved_model.pb'
