"""Exported graphs on ONNX Runtime against capjax, greedy search on this CPU.

Two models with random weights (so every caption runs the full length):

- the shapes model, end to end from resized pixels: capjax's NumPy
  `patches` extractor and jitted greedy search, against one ONNX graph
  holding both;
- the tutorial-size decoder (E256/U512, L64 x D2048, V5001) from features.

Each is timed at batch 1 (latency) and batch 64 (captions/s), capjax and
ONNX Runtime taking turns; both must give the same tokens. The export's
time and the graph's size are reported too. scripts/benchmark.py runs it
when jax2onnx is installed; alone:

  python -m capjax.benchmarks.export REPEATS MAX_LEN
"""

import functools
import time

import jax
import jax.numpy as jnp
import numpy as np

from capjax.benchmarks import harness
from capjax.benchmarks import workload
from capjax.data import extractors
from capjax.exporting import extractor as extractor_lib
from capjax.exporting import graph
from capjax.exporting import onnx_format
from capjax.model import decoding

# The shapes model of the README's quick start, its patches on a 4x4 grid.
SHAPES = workload.Sizes(
  vocab_size=31,
  embedding_dim=16,
  units=32,
  num_locations=16,
  feature_dim=16 * 16 * 3 + 16,
)
_PATCH_GRID = 4


def _params(model, sizes: workload.Sizes):
  features = jnp.zeros((1, sizes.num_locations, sizes.feature_dim))
  return jax.jit(model.init)(
    jax.random.PRNGKey(0), features, jnp.zeros((1, 2), jnp.int32)
  )['params']


def _session(fn, item_shape, input_name):
  """(ONNX Runtime session, export seconds, graph bytes) of fn."""
  import onnxruntime as ort  # noqa: PLC0415

  start = time.perf_counter()
  model = onnx_format.to_onnx(
    fn,
    item_shape,
    input_name=input_name,
    output_names=graph.OUTPUTS,
    per_image=False,
    what='greedy search',
  )
  data = model.SerializeToString()
  seconds = time.perf_counter() - start
  options = ort.SessionOptions()
  # Idle threads that spin take the cores the other thread needs: on this
  # shared 2-core CPU the shapes model's batch-1 latency fell by a third.
  options.add_session_config_entry('session.intra_op.allow_spinning', '0')
  session = ort.InferenceSession(
    data, options, providers=['CPUExecutionProvider']
  )
  return session, seconds, len(data)


def _compare(name, capjax_fn, session, input_name, inputs, repeats) -> dict:
  """Interleaved timings of capjax and ONNX Runtime on each input."""
  run = lambda x: session.run(['tokens'], {input_name: x})[0]
  fns = {}
  for label, x in inputs.items():
    if not np.array_equal(np.asarray(capjax_fn(x)), run(x)):
      raise AssertionError(f'{name}: ONNX Runtime and capjax disagree')
    fns[f'capjax_{label}'] = functools.partial(capjax_fn, x)
    fns[f'onnx_{label}'] = functools.partial(run, x)
  seconds = harness.interleaved_medians(fns, repeats)
  b = len(inputs['batch'])
  return {
    'capjax_latency_ms': 1e3 * seconds['capjax_single'],
    'onnx_latency_ms': 1e3 * seconds['onnx_single'],
    'capjax_captions_per_s': b / seconds['capjax_batch'],
    'onnx_captions_per_s': b / seconds['onnx_batch'],
  }


def bench_shapes(repeats: int, max_len: int) -> dict:
  """The shapes model from pixels: extractor and search, in capjax and ONNX."""
  model = workload.model(SHAPES)
  params = _params(model, SHAPES)
  search = graph.Search(max_len=max_len)
  extractor = extractors.patches_extractor(_PATCH_GRID)
  size = extractor.image_size
  fn = graph.pixels_fn(
    model,
    params,
    search,
    extractor_lib.GraphExtractor(
      extractor.info, size, extractor_lib.patches_features_fn(_PATCH_GRID)
    ),
  )
  session, export_s, size_bytes = _session(fn, (size, size, 3), graph.PIXELS)
  pixels = np.random.default_rng(1).uniform(
    0, 255, (workload.BATCH_SIZE, size, size, 3)
  )
  pixels = pixels.astype(np.float32)

  def capjax_fn(pixels_BSS3):
    features = extractor.features_fn(pixels_BSS3)
    return decoding.greedy_captions(
      params, features, model=model, max_len=max_len
    ).tokens_BT

  inputs = {'single': pixels[:1], 'batch': pixels}
  row = _compare('shapes', capjax_fn, session, graph.PIXELS, inputs, repeats)
  return row | {'export_s': export_s, 'onnx_bytes': size_bytes}


def bench_tutorial(repeats: int, max_len: int) -> dict:
  """The tutorial-size decoder from features."""
  model = workload.model()
  params = _params(model, workload.TUTORIAL)
  fn = graph.features_fn(model, params, graph.Search(max_len=max_len))
  item = (workload.NUM_LOCATIONS, workload.FEATURE_DIM)
  session, export_s, size_bytes = _session(fn, item, graph.FEATURES)
  features = workload.random_features(
    np.random.default_rng(1), workload.BATCH_SIZE
  )

  def capjax_fn(features_BLD):
    return decoding.greedy_captions(
      params, features_BLD, model=model, max_len=max_len
    ).tokens_BT

  inputs = {'single': features[:1], 'batch': features}
  row = _compare(
    'tutorial', capjax_fn, session, graph.FEATURES, inputs, repeats
  )
  return row | {'export_s': export_s, 'onnx_bytes': size_bytes}


def bench_export(repeats: int, max_len: int) -> dict:
  """Both models' rows, with the settings."""
  return {
    'shapes': bench_shapes(repeats, max_len),
    'tutorial': bench_tutorial(repeats, max_len),
    'max_len': max_len,
    'batch_size': workload.BATCH_SIZE,
  }


if __name__ == '__main__':
  import json  # noqa: PLC0415
  import sys  # noqa: PLC0415

  print(json.dumps(bench_export(int(sys.argv[1]), int(sys.argv[2])), indent=2))
