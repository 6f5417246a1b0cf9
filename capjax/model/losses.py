"""Masked caption losses, kept as sums and counts.

Every function returns sums over the batch together with the counts they
should be divided by. Sums add up exactly across devices, hosts and eval
batches; `normalize` turns them into means at the very end.
"""

import jax
import jax.numpy as jnp

Array = jax.Array


def token_mask(targets_BT: Array) -> Array:
  """1.0 where the target is a real token, 0.0 on padding (<pad> = 0)."""
  return (targets_BT != 0).astype(jnp.float32)


def cross_entropy_sums(
  logits_BTV: Array, targets_BT: Array
) -> dict[str, Array]:
  """Softmax cross-entropy and accuracy over the real (non-pad) targets.

  Returns:
    {'loss_sum', 'correct_sum', 'token_count'}: scalars; the mean loss is
    loss_sum / token_count.
  """
  if logits_BTV.shape[:2] != targets_BT.shape:
    raise ValueError(
      f'logits {logits_BTV.shape} do not match targets {targets_BT.shape}'
    )
  mask_BT = token_mask(targets_BT)
  logits_BTV = logits_BTV.astype(jnp.float32)
  # log Z does not depend on the shift, so the shift needs no gradient (its
  # gradient would be a one-hot over V that cancels exactly).
  max_BT = jax.lax.stop_gradient(jnp.max(logits_BTV, axis=-1))
  log_z_BT = max_BT + jnp.log(
    jnp.sum(jnp.exp(logits_BTV - max_BT[..., None]), axis=-1)
  )
  target_logit_BT = jnp.take_along_axis(
    logits_BTV, targets_BT[..., None], axis=-1
  )[..., 0]
  # The target is the argmax when it reaches the maximum: one pass over V
  # shared with logsumexp, where argmax would be another (a tie, which float
  # logits practically never have, counts as a hit).
  correct_BT = target_logit_BT >= max_BT
  return {
    'loss_sum': jnp.sum((log_z_BT - target_logit_BT) * mask_BT),
    'correct_sum': jnp.sum(correct_BT * mask_BT),
    'token_count': jnp.sum(mask_BT),
  }


def attention_penalty_sums(
  attention_BTL: Array, targets_BT: Array
) -> dict[str, Array]:
  """Show, Attend and Tell's doubly stochastic penalty: sum_i (1-sum_t a_ti)^2.

  Only steps that predict a real token count, so padding cannot push the
  attention around. Returns {'penalty_sum', 'caption_count'}: the mean
  per-caption penalty is penalty_sum / caption_count.
  """
  mask_BT = token_mask(targets_BT)
  coverage_BL = jnp.einsum(
    'btl,bt->bl', attention_BTL.astype(jnp.float32), mask_BT
  )
  has_tokens_B = jnp.any(mask_BT > 0, axis=-1)
  per_caption_B = jnp.sum((1.0 - coverage_BL) ** 2, axis=-1)
  return {
    'penalty_sum': jnp.sum(jnp.where(has_tokens_B, per_caption_B, 0.0)),
    'caption_count': jnp.sum(has_tokens_B.astype(jnp.float32)),
  }


def caption_loss(
  logits_BTV: Array,
  attention_BTL: Array,
  targets_BT: Array,
  attention_penalty: float = 0.0,
  token_normalizer: float | None = None,
) -> tuple[Array, dict[str, Array]]:
  """The training objective and its sums.

  loss = summed cross-entropy over real tokens / token_normalizer
         + attention_penalty * mean per-caption attention penalty.

  token_normalizer None divides by the batch's own token count (the mean
  over its tokens). A fixed normalizer (the expected token count of a batch)
  gives every token of the data set the same weight whatever its batch
  holds, which batches grouped by length need: divided by their own counts,
  batches of short captions would weigh each of their tokens more.
  """
  sums = cross_entropy_sums(logits_BTV, targets_BT)
  denominator = (
    jnp.maximum(sums['token_count'], 1.0)
    if token_normalizer is None
    else token_normalizer
  )
  loss = sums['loss_sum'] / denominator
  if attention_penalty:
    penalty = attention_penalty_sums(attention_BTL, targets_BT)
    sums.update(penalty)
    loss = loss + attention_penalty * (
      penalty['penalty_sum'] / jnp.maximum(penalty['caption_count'], 1.0)
    )
  return loss, sums


def normalize(sums: dict[str, Array]) -> dict[str, float]:
  """Means from summed metrics: loss, accuracy and (if present) penalty."""
  tokens = max(float(sums['token_count']), 1.0)
  metrics = {
    'loss': float(sums['loss_sum']) / tokens,
    'accuracy': float(sums['correct_sum']) / tokens,
  }
  if 'penalty_sum' in sums:
    captions = max(float(sums['caption_count']), 1.0)
    metrics['attention_penalty'] = float(sums['penalty_sum']) / captions
  return metrics
