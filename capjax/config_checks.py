"""Refusing configs that cannot work, before any data is read or compiled."""

import ml_collections

from capjax import errors


def check_config(config: ml_collections.ConfigDict) -> None:
  """Raises a UserError naming the first config field that cannot work."""
  positive = ('batch_size', 'max_caption_len', 'log_every_steps',
              'eval_every_steps', 'checkpoint_every_steps', 'keep_checkpoints',
              'embedding_dim', 'units', 'top_k')
  for name in positive:
    if config[name] <= 0:
      raise errors.UserError(
          f'config.{name} must be positive, got {config[name]}')
  if config.num_train_steps < 0 or config.learning_rate <= 0:
    raise errors.UserError('config.num_train_steps must be >= 0 and '
                           'config.learning_rate > 0')
  buckets = tuple(config.bucket_lengths)
  if not buckets or min(buckets) < 2 or max(buckets) < config.max_caption_len:
    raise errors.UserError(
        f'config.bucket_lengths {buckets} must be lengths >= 2 whose largest '
        f'is at least config.max_caption_len ({config.max_caption_len})')
  if not 0 <= config.dropout_rate < 1:
    raise errors.UserError(f'config.dropout_rate must be in [0, 1), got '
                           f'{config.dropout_rate}')
