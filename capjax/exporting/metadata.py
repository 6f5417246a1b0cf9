"""The files beside an exported graph: vocab, metadata, Triton's config.

capjax_export.json says everything a client needs to feed the graph and
read its answers without capjax: the preprocessing, the special token ids,
the input and output names, dtypes and shapes, and where the model came
from. Shapes name the dynamic batch axis 'batch'.
"""

import pathlib
from typing import Any

import capjax
from capjax import files
from capjax import inference
from capjax.data import vocab as vocab_lib
from capjax.exporting import graph

FORMAT = 'capjax.export/1'
METADATA_FILE = 'capjax_export.json'
VOCAB_FILE = 'vocab.json'
MODEL_NAME = 'model'  # the servers' model repository entry: OUT/model/1/

# The resize capjax applies (capjax.data.images.resize_bilinear).
RESIZE = {
  'method': 'bilinear',
  'antialias': False,
  'coordinates': 'half_pixel',
  'arithmetic': 'float32, as tf.image.resize',
}
# How capjax decodes an image file (capjax.data.images.load_image).
DECODE = (
  'RGB, 8 bits per channel; EXIF orientation applied; first frame of an '
  'animation; transparent pixels composited onto white'
)

_TRITON_TYPES = {'float32': 'TYPE_FP32', 'int32': 'TYPE_INT32'}


def tensor(name: str, dtype: str, shape: list) -> dict[str, Any]:
  return {'name': name, 'dtype': dtype, 'shape': shape}


def input_spec(item_shape: tuple[int, ...], from_features: bool) -> dict:
  name = graph.FEATURES if from_features else graph.PIXELS
  return tensor(name, 'float32', ['batch', *item_shape])


def output_specs(max_len: int, num_locations: int) -> list[dict[str, Any]]:
  """The graph's outputs (graph.OUTPUTS), T = max_len, L locations."""
  return [
    tensor('tokens', 'int32', ['batch', max_len]),
    tensor('lengths', 'int32', ['batch']),
    tensor('log_prob', 'float32', ['batch']),
    tensor('attention', 'float32', ['batch', max_len, num_locations]),
  ]


def describe(
  trained: inference.TrainedModel,
  search: graph.Search,
  *,
  model_format: str,
  model_path: str,
  inputs: list[dict[str, Any]],
  outputs: list[dict[str, Any]],
  image_size: int | None,
  extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
  """capjax_export.json's contents; image_size None: a graph of features."""
  if image_size is None:
    preprocessing: dict[str, Any] = {
      'input': 'feature grids (L, D) as the extractor below makes them',
    }
  else:
    preprocessing = {
      'decode': DECODE,
      'image_size': image_size,
      'resize': RESIZE,
      'input': (
        'the resized image, float32 RGB in [0, 255], not rounded; the graph '
        'scales it as the extractor does'
      ),
    }
  return {
    'format': FORMAT,
    'capjax_version': capjax.__version__,
    'checkpoint_step': trained.step,
    'model_format': model_format,
    'model': model_path,
    'search': search.describe(),
    'extractor': trained.feature_info['extractor'],
    'preprocessing': preprocessing,
    'tokens': {
      'pad': vocab_lib.Vocab.pad_id,
      'start': vocab_lib.Vocab.start_id,
      'end': vocab_lib.Vocab.end_id,
      'unk': vocab_lib.Vocab.unk_id,
      'vocab': VOCAB_FILE,
      'vocab_size': trained.vocab.size,
    },
    'inputs': inputs,
    'outputs': outputs,
    **(extra or {}),
  }


def triton_config(
  inputs: list[dict[str, Any]],
  outputs: list[dict[str, Any]],
  max_batch_size: int = 64,
) -> str:
  """A minimal Triton config.pbtxt for the ONNX graph, with dynamic batching."""

  def entry(spec):
    dims = ', '.join(str(d) for d in spec['shape'][1:])
    # Triton needs a dimension per item: a scalar is [ 1 ], reshaped to [ ].
    shape = (
      f'dims: [ {dims} ]' if dims else 'dims: [ 1 ] reshape: { shape: [ ] }'
    )
    return (
      f'  {{ name: "{spec["name"]}" '
      f'data_type: {_TRITON_TYPES[spec["dtype"]]} {shape} }}'
    )

  return '\n'.join(
    [
      f'name: "{MODEL_NAME}"',
      'backend: "onnxruntime"',
      f'max_batch_size: {max_batch_size}',
      'input [',
      ',\n'.join(map(entry, inputs)),
      ']',
      'output [',
      ',\n'.join(map(entry, outputs)),
      ']',
      'dynamic_batching { }',
      '',
    ]
  )


def write_sidecars(
  out: pathlib.Path, trained: inference.TrainedModel, description: dict
) -> None:
  trained.vocab.save(out / VOCAB_FILE)
  files.write_json_atomic(out / METADATA_FILE, description, indent=2)
