"""A workdir's checkpoint -> an artifact directory that servers take as it is.

OUT/capjax_export.json   what the graph takes and gives (metadata.py)
OUT/vocab.json           token ids -> words
OUT/model/config.pbtxt   Triton's model configuration (ONNX only)
OUT/model/1/model.onnx   the graph (ONNX), or
OUT/model/1/saved_model.pb, variables/   (SavedModel, for TF Serving)
"""

import dataclasses
import os
import pathlib
import time
from typing import Any

from capjax import errors
from capjax import inference
from capjax.exporting import extractor as extractor_lib
from capjax.exporting import graph
from capjax.exporting import metadata
from capjax.model import decoding

FORMATS = ('onnx', 'saved_model')
VERSION_DIR = pathlib.Path(metadata.MODEL_NAME) / '1'
ONNX_FILE = VERSION_DIR / 'model.onnx'


@dataclasses.dataclass(frozen=True)
class Exported:
  """What an export wrote.

  Attributes:
    out: the artifact's directory.
    model: the graph's path inside it.
    description: capjax_export.json's contents.
    seconds: the export's time, loading the checkpoint included.
  """

  out: pathlib.Path
  model: pathlib.Path
  description: dict
  seconds: float

  def size_bytes(self) -> int:
    """The artifact's size on disk, every file counted."""
    return sum(p.stat().st_size for p in self.out.rglob('*') if p.is_file())


def _what(search: graph.Search, from_features: bool) -> str:
  runs = 'greedy search' if search.beam_size == 1 else 'beam search'
  return runs if from_features else f'the extractor or {runs}'


def _prepare_out(out: pathlib.Path) -> None:
  if (out / metadata.MODEL_NAME).exists():
    raise errors.UserError(
      f'{out / metadata.MODEL_NAME} exists already; choose another --out or '
      'remove it'
    )
  (out / VERSION_DIR).mkdir(parents=True)


def export_workdir(
  workdir: str | os.PathLike[str],
  out: str | os.PathLike[str],
  *,
  fmt: str = 'onnx',
  beam_size: int = 1,
  alpha: float = 0.0,
  max_len: int | None = None,
  step: int | None = None,
  from_features: bool = False,
) -> Exported:
  """Exports a workdir's checkpoint (see inference.load_trained for `step`).

  Raises:
    UserError: a flag or the workdir cannot be exported; the message says
      why (an extractor with no JAX form, features from --from_numpy, a
      primitive the converter lacks) and what to do.
  """
  start = time.perf_counter()
  if fmt not in FORMATS:
    raise errors.UserError(f'--format must be one of {FORMATS}, got {fmt!r}')
  trained = inference.load_trained(workdir, step)
  search = graph.Search(
    max_len=max_len or decoding.max_caption_tokens(trained.config),
    beam_size=beam_size,
    alpha=alpha,
  )
  if from_features:
    item_shape: tuple[int, ...] = trained.feature_shape_LD
    fn = graph.features_fn(trained.model, trained.params, search)
    image_size = None
  else:
    extractor = extractor_lib.graph_extractor(
      trained.config, trained.feature_info
    )
    image_size = extractor.image_size
    item_shape = (image_size, image_size, 3)
    fn = graph.pixels_fn(trained.model, trained.params, search, extractor)
  inputs = [metadata.input_spec(item_shape, from_features)]
  outputs = metadata.output_specs(search.max_len, trained.feature_shape_LD[0])
  out = pathlib.Path(out)
  _prepare_out(out)
  if fmt == 'onnx':
    from capjax.exporting import onnx_format  # noqa: PLC0415

    model = onnx_format.to_onnx(
      fn,
      item_shape,
      input_name=inputs[0]['name'],
      output_names=graph.OUTPUTS,
      per_image=search.beam_size > 1,
      what=_what(search, from_features),
    )
    model_path = out / ONNX_FILE
    model_path.write_bytes(model.SerializeToString())
    (out / metadata.MODEL_NAME / 'config.pbtxt').write_text(
      metadata.triton_config(inputs, outputs)
    )
    extra: dict[str, Any] = {'onnx_opset': onnx_format.OPSET}
  else:
    from capjax.exporting import saved_model  # noqa: PLC0415

    model_path = saved_model.save(
      fn,
      item_shape,
      out / VERSION_DIR,
      vocab=trained.vocab,
      input_name=inputs[0]['name'],
      image_size=image_size,
      per_image=search.beam_size > 1,
    )
    extra = {'signatures': saved_model.describe_signatures(image_size)}
  description = metadata.describe(
    trained,
    search,
    model_format=fmt,
    model_path=str(model_path.relative_to(out)),
    inputs=inputs,
    outputs=outputs,
    image_size=image_size,
    extra=extra,
  )
  metadata.write_sidecars(out, trained, description)
  return Exported(out, model_path, description, time.perf_counter() - start)
