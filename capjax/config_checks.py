"""Refusing configs that cannot work, before any data is read or compiled.

This is the one place that checks a config: every field's type, every
choice and every range. Training checks its config here before it writes,
generates, extracts or compiles anything, and a workdir's saved config is
checked here as it is read, so the modules that act on a config assume a
checked one.

Every config is checked against the default config's fields
(capjax/configs/default.py): a field it does not have is refused by name, and
a value of another type by field and expected type. A workdir's saved
config is read the same way, onto the defaults, so a field added to capjax
after the workdir was written takes its default value.
"""

from __future__ import annotations

import pathlib
from typing import Any, TYPE_CHECKING

from capjax import errors

# The data modules read the choices and split names below on hosts that may
# lack ml_collections (an accelerator host running only JAX): it is imported
# where a config is built or checked, not with the module.
if TYPE_CHECKING:
  import ml_collections

# The validation metrics config.best_metric may name, and which way is better.
BEST_METRICS = {'cider': 'max', 'bleu4': 'max', 'loss': 'min'}

# The values each choice-valued field may take (configs/default.py says what
# each one does).
CHOICES = {
  'dataset': ('shapes', 'coco_json', 'flickr', 'tfds_coco'),
  'extractor': ('inception_v3', 'patches'),
  'extractor_backend': ('auto', 'jax', 'keras'),
  'dtype': ('float32', 'bfloat16'),
  'schedule': ('constant', 'warmup_cosine'),
  'objective': ('xent', 'scst'),
  'scst_baseline': ('greedy', 'mean'),
  'best_metric': tuple(BEST_METRICS),
  'best_rule': ('best', 'last_within'),
  'device_data': ('auto', 'on', 'off'),
  'device_data_layout': ('auto', 'replicated', 'sharded'),
}

# The split names of the data sets that have fixed ones; a 'coco_json' split
# names its files (data.datasets). Flickr's 'dev' is its 'val'; 'all' is
# every image of its token file.
SPLITS = {
  'shapes': ('train', 'val', 'test'),
  'flickr': ('train', 'val', 'dev', 'test', 'all'),
  'tfds_coco': ('train', 'restval', 'val', 'test'),
}

# config.extractor_weights other than a weights file.
NAMED_WEIGHTS = ('imagenet', 'none')

_POSITIVE = (
  'batch_size',
  'max_caption_len',
  'log_every_steps',
  'eval_every_steps',
  'checkpoint_every_steps',
  'keep_checkpoints',
  'embedding_dim',
  'units',
  'top_k',
  'patch_grid',
  'extract_batch_size',
  'shard_size',
  'shapes.image_size',
)
_NOT_NEGATIVE = (
  'num_train_steps',
  'warmup_steps',
  'grad_clip_norm',
  'attention_penalty',
  'num_eval_examples',
  'num_caption_eval_images',
  'shapes.num_train',
  'shapes.num_val',
  'shapes.num_test',
)


def _type_name(value: Any) -> str:
  return {
    bool: 'true or false',
    int: 'an integer',
    float: 'a number',
    str: 'a string',
    tuple: 'a list',
  }.get(type(value), type(value).__name__)


def _converted(expected: Any, value: Any) -> Any:
  """`value` as the type of `expected`, or raises TypeError."""
  if isinstance(expected, bool) or isinstance(value, bool):
    if isinstance(expected, bool) and isinstance(value, bool):
      return value
  elif isinstance(expected, float) and isinstance(value, (int, float)):
    return float(value)
  elif isinstance(expected, tuple) and isinstance(value, (list, tuple)):
    return tuple(value)
  elif type(value) is type(expected):  # noqa: E721
    return value
  raise TypeError


def _prefixed(source: str, message: str) -> errors.UserError:
  return errors.UserError(f'{source}: {message}' if source else message)


def _merge(
  config: ml_collections.ConfigDict,
  values: dict[str, Any],
  prefix: str,
  source: str,
) -> None:
  for name, value in values.items():
    field = f'{prefix}{name}'
    if name not in config:
      raise _prefixed(source, f'unknown config field {field!r}')
    expected = config[name]
    if isinstance(expected, type(config)):
      if not isinstance(value, (dict, type(config))):
        raise _prefixed(
          source, f'config.{field} must be a group of fields, got {value!r}'
        )
      _merge(expected, dict(value), f'{field}.', source)
      continue
    try:
      config[name] = _converted(expected, value)
    except TypeError:
      raise _prefixed(
        source,
        f'config.{field} must be {_type_name(expected)}, got {value!r}',
      ) from None


def from_values(
  values: dict[str, Any], source: str
) -> ml_collections.ConfigDict:
  """The default config with `values` set, each checked.

  Args:
    values: field values, nested as the config's groups.
    source: where they come from, named in errors (a file), or ''.

  Raises:
    UserError: a field the default config lacks, or a value of another
      type; the message names the field (and the expected type).
  """
  from capjax.configs import default  # noqa: PLC0415 (see the imports)

  config = default.get_config()
  _merge(config, values, '', source)
  return config


def one_of(field: str, value: Any, choices: tuple[str, ...]) -> str:
  """The one-line refusal of `value`, not one of `choices`, for `field`."""
  return f'{field} must be one of {", ".join(choices)}, got {value!r}'


def split_names(
  split: str, dataset: str = '', field: str = 'split'
) -> list[str]:
  """The names of a '+'-joined split: 'train+restval' -> ['train', 'restval'].

  Raises:
    UserError: an empty name, or one that `dataset` (if given) does not
      have; the message names `field`.
  """
  names = [name.strip() for name in split.split('+')]
  if not all(names):
    raise errors.UserError(
      f'{field} {split!r}: use names joined with "+", e.g. "train+restval"'
    )
  known = SPLITS.get(dataset)
  for name in names:
    if known and name not in known:
      raise errors.UserError(
        f'{field} {split!r}: unknown {dataset} split {name!r}; use one of '
        f'{", ".join(known)}, joined with "+"'
      )
  return names


def check_config(
  config: ml_collections.ConfigDict, source: str = '', *, paths: bool = True
) -> None:
  """Raises a UserError naming the first config field that cannot work.

  Args:
    config: a training config.
    source: the file it was read from, which starts each message, or ''.
    paths: also check the files and directories the config names. A trained
      workdir's config skips them: its model captions precomputed features
      without the extractor's weights file, and its init_from source is no
      longer read.
  """
  from_values(config.to_dict(), source)
  for name, choices in CHOICES.items():
    if config[name] not in choices:
      raise _prefixed(source, one_of(f'config.{name}', config[name], choices))
  try:
    for name in ('train_split', 'eval_split'):
      split_names(config[name], config.dataset, f'config.{name}')
    _check_ranges(config)
    _check_scst(config)
    if paths:
      _check_paths(config)
  except errors.UserError as e:
    raise _prefixed(source, str(e)) from None


def _field(config: ml_collections.ConfigDict, name: str) -> Any:
  value = config
  for part in name.split('.'):
    value = value[part]
  return value


def _check_ranges(config: ml_collections.ConfigDict) -> None:
  for name in _POSITIVE:
    if _field(config, name) <= 0:
      raise errors.UserError(
        f'config.{name} must be positive, got {_field(config, name)}'
      )
  for name in _NOT_NEGATIVE:
    if _field(config, name) < 0:
      raise errors.UserError(
        f'config.{name} must be >= 0, got {_field(config, name)}'
      )
  if config.learning_rate <= 0:
    raise errors.UserError(
      f'config.learning_rate must be positive, got {config.learning_rate}'
    )
  buckets = tuple(config.bucket_lengths)
  if not buckets or min(buckets) < 2 or max(buckets) < config.max_caption_len:
    raise errors.UserError(
      f'config.bucket_lengths {buckets} must be lengths >= 2 whose largest '
      f'is at least config.max_caption_len ({config.max_caption_len})'
    )
  if not 0 <= config.dropout_rate < 1:
    raise errors.UserError(
      f'config.dropout_rate must be in [0, 1), got {config.dropout_rate}'
    )
  _check_dispatch(config)
  if config.best_rule != 'best' and (
    config.best_metric == 'loss' or not config.num_caption_eval_images
  ):
    raise errors.UserError(
      f'config.best_rule {config.best_rule!r} needs a caption metric: '
      "set config.best_metric to 'cider' or 'bleu4' and "
      'config.num_caption_eval_images above 0'
    )


def check_extractor_weights(weights: str) -> None:
  """Raises unless `weights` is one of NAMED_WEIGHTS or an existing file."""
  if weights not in NAMED_WEIGHTS and not pathlib.Path(weights).is_file():
    raise errors.UserError(
      f'config.extractor_weights must be one of {", ".join(NAMED_WEIGHTS)} '
      f'or an existing weights file, got {weights!r}'
    )


def _check_paths(config: ml_collections.ConfigDict) -> None:
  if config.extractor == 'inception_v3':
    check_extractor_weights(config.extractor_weights)
  if (
    config.init_from
    and not pathlib.Path(config.init_from).expanduser().is_dir()
  ):
    raise errors.UserError(
      f'config.init_from must be a workdir, got {config.init_from!r}: no '
      'such directory'
    )


def _check_scst(config: ml_collections.ConfigDict) -> None:
  if config.objective != 'scst':
    return
  if not config.init_from:
    raise errors.UserError(
      "config.objective 'scst' fine-tunes a trained model: set "
      'config.init_from to its workdir'
    )
  if config.scst_xent_weight < 0 or config.init_from_step < 0:
    raise errors.UserError(
      'config.scst_xent_weight and config.init_from_step must be >= 0'
    )
  least = 2 if config.scst_baseline == 'mean' else 1
  if config.scst_samples < least:
    raise errors.UserError(
      f'config.scst_samples must be at least {least} with the '
      f'{config.scst_baseline!r} baseline, got {config.scst_samples}'
    )


def _check_dispatch(config: ml_collections.ConfigDict) -> None:
  k = config.steps_per_dispatch
  if k <= 0:
    raise errors.UserError(
      f'config.steps_per_dispatch must be positive, got {k}'
    )
  intervals = ('log_every_steps', 'eval_every_steps', 'checkpoint_every_steps')
  for name in intervals:
    if config[name] % k:
      raise errors.UserError(
        f'config.steps_per_dispatch ({k}) must divide config.{name} '
        f'({config[name]}): metrics, evaluations and checkpoints happen '
        'between dispatches'
      )
