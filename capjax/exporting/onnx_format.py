"""The captioning function as one ONNX graph, by jax2onnx.

Greedy search converts with a dynamic batch dimension as it is. Beam search
does not: jax2onnx resolves the symbolic batch size inside the loop body
from the wrong tensor (one of B * K rows), and the graph fails ONNX's shape
inference. So beam search is converted for one image and wrapped in an ONNX
`Loop` over the batch: the batch stays dynamic, its images are searched one
after the other.
"""

from collections.abc import Callable, Iterator
import contextlib
import re

from flax import linen
from flax.linen import pooling
import jax
import jax.numpy as jnp
import onnx
from onnx import helper

from capjax import errors

OPSET = 23
# jax2onnx replaces functions while it traces. Its jnp.full needs a
# concrete shape (search.py fills a (batch,) vector): the original is put
# back, its primitive converts. (Putting back all of jax.numpy breaks other
# ops' dynamic shapes.) Its Flax pools take the window by keyword only, and
# capjax.model.inception passes it by position: they are called by keyword.
# Their originals would not do: the max pool they emit becomes an ONNX
# MaxPool that ONNX Runtime refuses. Taken at import, before any patching.
_FULL = jnp.full
_POOLS = tuple(
  (module, name, getattr(module, name))
  for module in (linen, pooling)
  for name in ('max_pool', 'avg_pool')
)
_INNER = 'image_'  # prefix of the one-image graph's input and outputs


def _window_by_keyword(patched: Callable) -> Callable:
  def pool(inputs, window_shape, strides=None, padding='VALID', **kwargs):
    return patched(
      inputs,
      window_shape=window_shape,
      strides=strides,
      padding=padding,
      **kwargs,
    )

  return pool


@contextlib.contextmanager
def _convertible() -> Iterator[None]:
  """jax2onnx's patches, amended for capjax's calls (see _FULL, _POOLS)."""
  saved = [(jnp, 'full', jnp.full)]
  saved += [(m, n, getattr(m, n)) for m, n, original in _POOLS]
  if jnp.full is not _FULL:
    jnp.full = _FULL
  for module, name, original in _POOLS:
    current = getattr(module, name)
    if current is not original:
      setattr(module, name, _window_by_keyword(current))
  try:
    yield
  finally:
    for module, name, value in saved:
      setattr(module, name, value)


def _convert(
  fn: Callable, shape: tuple, input_name: str, output_names: tuple[str, ...]
) -> onnx.ModelProto:
  from jax2onnx import to_onnx  # noqa: PLC0415

  def traced(x):
    with _convertible():
      return fn(x)

  try:
    model = to_onnx(
      traced,
      [shape],
      opset=OPSET,
      model_name='capjax',
      input_names=[input_name],
      output_names=list(output_names),
    )
  finally:
    # Functions jitted inside JAX and Flax (jax.nn's among them) cached
    # traces made under the converter's patches; later calls must not
    # reuse them.
    jax.clear_caches()
  _hoist_loop_constants(model.graph)
  return model


def _rename_uses(graph: onnx.GraphProto, old: str, new: str) -> None:
  """Every node input named `old`, in `graph` and its subgraphs, -> `new`."""
  for node in graph.node:
    for k, name in enumerate(node.input):
      if name == old:
        node.input[k] = new
    for attribute in node.attribute:
      if attribute.type == onnx.AttributeProto.GRAPH:
        _rename_uses(attribute.g, old, new)


def _hoist_loop_constants(graph: onnx.GraphProto) -> None:
  """Values a Loop only passes on, read from the outer scope instead.

  jax2onnx makes every value the while loop closes over (the parameters)
  a loop-carried variable that each iteration hands on through Identity, so
  ONNX Runtime copies all the weights at every step. A subgraph may read
  the outer graph's values directly: this rewires each such variable to
  its value outside, and drops it from the loop.
  """
  for node in graph.node:
    if node.op_type != 'Loop':
      continue
    (body_attr,) = [a for a in node.attribute if a.name == 'body']
    body = body_attr.g
    producers = {o: n for n in body.node for o in n.output}
    num_carried = len(body.input) - 2
    passed_on = []
    for j in range(num_carried):
      name = body.input[j + 2].name
      producer = producers.get(body.output[j + 1].name)
      if (
        producer is not None
        and producer.op_type == 'Identity'
        and list(producer.input) == [name]
        and node.input[j + 2]  # an omitted optional input has no value
      ):
        passed_on.append(j)
    for j in reversed(passed_on):
      outer = node.input[j + 2]
      producer = producers[body.output[j + 1].name]
      body.node.remove(producer)
      _rename_uses(body, body.input[j + 2].name, outer)
      _rename_uses(graph, node.output[j], outer)
      del body.input[j + 2]
      del body.output[j + 1]
      del node.input[j + 2]
      del node.output[j]


def _per_image_loop(
  inner: onnx.ModelProto, input_name: str, output_names: tuple[str, ...]
) -> onnx.ModelProto:
  """A one-image graph run by a `Loop` over the batch of a dynamic input.

  The inner graph's input and outputs are named _INNER + name; its nodes
  become the loop body, which slices image i and squeezes each output's
  batch axis, so that the loop stacks the images' results into (B, ...).
  """
  g = inner.graph
  (inner_input,) = g.input
  i64 = onnx.TensorProto.INT64
  body_nodes = [
    helper.make_node('Unsqueeze', ['i', 'loop_axis0'], ['i_1']),
    helper.make_node('Add', ['i_1', 'loop_one'], ['i_plus_1']),
    helper.make_node(
      'Slice', [input_name, 'i_1', 'i_plus_1', 'loop_axis0'], [inner_input.name]
    ),
    *g.node,
    helper.make_node('Identity', ['cond_in'], ['cond_out']),
  ]
  body_outputs = [
    helper.make_tensor_value_info('cond_out', onnx.TensorProto.BOOL, [])
  ]
  for out in g.output:
    name = out.name[len(_INNER) :]
    body_nodes.append(
      helper.make_node('Squeeze', [out.name, 'loop_axis0'], [f'{name}_i'])
    )
    elem = out.type.tensor_type.elem_type
    body_outputs.append(helper.make_tensor_value_info(f'{name}_i', elem, None))
  body = helper.make_graph(
    body_nodes,
    'one_image',
    [
      helper.make_tensor_value_info('i', i64, []),
      helper.make_tensor_value_info('cond_in', onnx.TensorProto.BOOL, []),
    ],
    body_outputs,
    value_info=list(g.value_info),
  )
  image_type = inner_input.type.tensor_type
  image_shape = ['batch'] + [d.dim_value for d in image_type.shape.dim[1:]]
  outer_nodes = [
    helper.make_node('Shape', [input_name], ['batch_1'], start=0, end=1),
    helper.make_node('Squeeze', ['batch_1'], ['batch']),
    helper.make_node(
      'Loop', ['batch', 'loop_true'], list(output_names), body=body
    ),
  ]
  constants = [
    helper.make_tensor('loop_axis0', i64, [1], [0]),
    helper.make_tensor('loop_one', i64, [1], [1]),
    helper.make_tensor('loop_true', onnx.TensorProto.BOOL, [], [True]),
  ]
  outputs = []
  for out, name in zip(g.output, output_names):
    dims = [d.dim_value for d in out.type.tensor_type.shape.dim[1:]]
    elem = out.type.tensor_type.elem_type
    outputs.append(helper.make_tensor_value_info(name, elem, ['batch', *dims]))
  graph = helper.make_graph(
    outer_nodes,
    'capjax',
    [
      helper.make_tensor_value_info(
        input_name, image_type.elem_type, image_shape
      )
    ],
    outputs,
    initializer=[*g.initializer, *constants],
  )
  model = helper.make_model(
    graph, opset_imports=list(inner.opset_import), producer_name='capjax'
  )
  model.ir_version = inner.ir_version
  model.functions.extend(inner.functions)
  return model


def _missing_primitive(
  error: NotImplementedError, what: str
) -> errors.UserError:
  match = re.search(r"primitive '([^']+)'", str(error))
  primitive = match.group(1) if match else str(error)
  return errors.UserError(
    f'the ONNX converter (jax2onnx) has no rule for the JAX primitive '
    f'{primitive!r}, which {what} uses; try another --beam_size or '
    '--format saved_model'
  )


def to_onnx(
  fn: Callable,
  item_shape: tuple[int, ...],
  *,
  input_name: str,
  output_names: tuple[str, ...],
  per_image: bool,
  what: str,
) -> onnx.ModelProto:
  """The ONNX model of `fn`, whose input is (B, *item_shape) float32.

  Args:
    fn: the captioning function, batch first in and out.
    item_shape: the input's shape without the batch axis.
    input_name: the graph's input name.
    output_names: the graph's output names, in fn's order.
    per_image: convert for one image and loop over the batch in ONNX (see
      the module's docstring); else convert with a dynamic batch.
    what: what fn runs, for the message of a missing primitive.

  Raises:
    UserError: jax2onnx cannot convert a primitive fn uses.
  """
  try:
    if not per_image:
      return _convert(fn, ('B', *item_shape), input_name, output_names)
    inner = _convert(
      fn,
      (1, *item_shape),
      _INNER + input_name,
      tuple(_INNER + n for n in output_names),
    )
  except NotImplementedError as e:
    raise _missing_primitive(e, what) from None
  model = _per_image_loop(inner, input_name, output_names)
  onnx.checker.check_model(model)
  return model
