"""Refusing configs that cannot work, before any data is read or compiled.

Every config is checked against the default config's fields
(capjax/configs/default.py): a field it does not have is refused by name, and
a value of another type by field and expected type. A workdir's saved
config is read the same way, onto the defaults, so a field added to capjax
after the workdir was written takes its default value.
"""

from typing import Any

import ml_collections

from capjax import errors
from capjax.configs import default

# The validation metrics config.best_metric may name, and which way is better.
BEST_METRICS = {'cider': 'max', 'bleu4': 'max', 'loss': 'min'}
OBJECTIVES = ('xent', 'scst')
SCST_BASELINES = ('greedy', 'mean')
BEST_RULES = ('best', 'last_within')


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


def _merge(
  config: ml_collections.ConfigDict,
  values: dict[str, Any],
  prefix: str,
  source: str,
) -> None:
  for name, value in values.items():
    field = f'{prefix}{name}'
    if name not in config:
      raise errors.UserError(f'{source}: unknown config field {field!r}')
    expected = config[name]
    if isinstance(expected, ml_collections.ConfigDict):
      if not isinstance(value, (dict, ml_collections.ConfigDict)):
        raise errors.UserError(
          f'{source}: config.{field} must be a group of fields, got {value!r}'
        )
      _merge(expected, dict(value), f'{field}.', source)
      continue
    try:
      config[name] = _converted(expected, value)
    except TypeError:
      raise errors.UserError(
        f'{source}: config.{field} must be {_type_name(expected)}, got '
        f'{value!r}'
      ) from None


def from_values(
  values: dict[str, Any], source: str
) -> ml_collections.ConfigDict:
  """The default config with `values` set, each checked.

  Args:
    values: field values, nested as the config's groups.
    source: where they come from, named in errors (a file, 'the config').

  Raises:
    UserError: a field the default config lacks, or a value of another
      type; the message names the field (and the expected type).
  """
  config = default.get_config()
  _merge(config, values, '', source)
  return config


def check_config(config: ml_collections.ConfigDict) -> None:
  """Raises a UserError naming the first config field that cannot work."""
  from_values(config.to_dict(), 'the config')
  positive = (
    'batch_size',
    'max_caption_len',
    'log_every_steps',
    'eval_every_steps',
    'checkpoint_every_steps',
    'keep_checkpoints',
    'embedding_dim',
    'units',
    'top_k',
  )
  for name in positive:
    if config[name] <= 0:
      raise errors.UserError(
        f'config.{name} must be positive, got {config[name]}'
      )
  if config.num_train_steps < 0 or config.learning_rate <= 0:
    raise errors.UserError(
      'config.num_train_steps must be >= 0 and config.learning_rate > 0'
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
  _check_objective(config)
  if config.best_metric not in BEST_METRICS:
    raise errors.UserError(
      f'config.best_metric must be one of {", ".join(BEST_METRICS)}, got '
      f'{config.best_metric!r}'
    )
  if config.best_rule not in BEST_RULES:
    raise errors.UserError(
      f'config.best_rule must be one of {", ".join(BEST_RULES)}, got '
      f'{config.best_rule!r}'
    )
  if config.best_rule != 'best' and (
    config.best_metric == 'loss' or not config.num_caption_eval_images
  ):
    raise errors.UserError(
      f'config.best_rule {config.best_rule!r} needs a caption metric: '
      "set config.best_metric to 'cider' or 'bleu4' and "
      'config.num_caption_eval_images above 0'
    )


def _check_objective(config: ml_collections.ConfigDict) -> None:
  if config.objective not in OBJECTIVES:
    raise errors.UserError(
      f'config.objective must be one of '
      f'{", ".join(OBJECTIVES)}, got {config.objective!r}'
    )
  if config.objective != 'scst':
    return
  if not config.init_from:
    raise errors.UserError(
      "config.objective 'scst' fine-tunes a trained model: set "
      'config.init_from to its workdir'
    )
  if config.scst_baseline not in SCST_BASELINES:
    raise errors.UserError(
      f'config.scst_baseline must be one of {", ".join(SCST_BASELINES)}, '
      f'got {config.scst_baseline!r}'
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
