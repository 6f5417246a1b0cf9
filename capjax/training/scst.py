"""Self-critical sequence training (Rennie et al. 2017) in one jitted step.

After cross-entropy training, SCST optimises the evaluation metric itself.
For each image of the batch the step

1. draws K captions from the model (temperature 1: the model's own
   distribution, which the policy gradient below assumes);
2. scores each with CIDEr-D against the image's references
   (capjax.metrics.cider), on the device, in the same jit;
3. takes a baseline b: the CIDEr-D of the image's greedy caption
   (`'greedy'`, Rennie et al.), or the mean of the other K - 1 samples'
   (`'mean'`, the "new self-critical" variant of Luo 2020, which needs no
   greedy decode);
4. descends  loss = -1/(B K) sum_bk (r_bk - b_bk) log p(sample_bk),
   where log p is the sum of the sample's token log-probabilities,
   recomputed by teacher forcing so that it has a gradient; with
   config.scst_xent_weight w > 0, plus w times the mean -log p of the
   image's reference captions (`reference_xent`), a cross-entropy anchor to
   the human captions for small data sets, where the policy otherwise
   drifts toward captions the training references no longer support.

The sum over a sample's tokens is the sequence log-probability that the
policy-gradient theorem differentiates, and the 1/(B K) makes the gradient an
estimate of the gradient of the mean reward at any batch size. Dividing by
the batch's token count instead, as some implementations do, scales every
step by a batch-dependent constant (shorter samples, larger steps) without
changing the direction.

The samples and the baseline carry no gradient: (r - b) is a constant
weight. Dropout is off (config.dropout_rate is not used): log p must be the
probability of the policy that drew the samples. Padding after a sample's
<end> is neither scored by CIDEr-D nor counted in log p.
"""

from collections.abc import Callable
import functools
from typing import Any, cast

import jax
import jax.numpy as jnp
import optax

from capjax.data import vocab as vocab_lib
from capjax.metrics import cider
from capjax.model import captioner
from capjax.model import decoding
from capjax.model import search
from capjax.training import state as state_lib

Array = jax.Array
Batch = dict[str, Array]
RewardFn = Callable[[Array, Batch, Any], Array]
_START = vocab_lib.Vocab.start_id


def _repeat(tree: Any, k: int) -> Any:
  """Each row k times in a row: (B, ...) -> (B * k, ...), row b*k + j."""
  return jax.tree_util.tree_map(lambda a: jnp.repeat(a, k, axis=0), tree)


def _teacher_forced_log_probs(
  module: captioner.Captioner,
  features_BLD: Array,
  samples_xT: Array,
  num_samples: int,
) -> Array:
  """log p of each token of samples_xT (x = B * K, K samples per image)."""
  encoded = _repeat(module.encode(features_BLD), num_samples)
  start_x1 = jnp.full((samples_xT.shape[0], 1), _START, samples_xT.dtype)
  token_in_xT3U = module.token_inputs(
    jnp.concatenate([start_x1, samples_xT[:, :-1]], axis=1)
  )
  h_xTU, _ = module.unroll(encoded, token_in_xT3U)
  log_probs_xTV = search.token_log_probs(module.head(h_xTU))
  return jnp.take_along_axis(log_probs_xTV, samples_xT[..., None], axis=-1)[
    ..., 0
  ]


def sequence_log_probs(
  params: Any,
  features_BLD: Array,
  samples_BKT: Array,
  *,
  model: captioner.Captioner,
) -> Array:
  """log p(sample) of K samples per image: the sum over its real tokens.

  Returns:
    (B, K) float32; positions after <end> (<pad> = 0) count for nothing.
  """
  batch, num_samples, length = samples_BKT.shape
  samples_xT = samples_BKT.reshape(batch * num_samples, length)
  # Module.apply's return type also allows (output, variables).
  token_log_probs_xT = cast(
    Array,
    model.apply(
      {'params': params},
      features_BLD,
      samples_xT,
      num_samples,
      method=_teacher_forced_log_probs,
    ),
  )
  mask_xT = samples_xT != vocab_lib.Vocab.pad_id
  return jnp.sum(jnp.where(mask_xT, token_log_probs_xT, 0.0), axis=-1).reshape(
    batch, num_samples
  )


def policy_gradient_loss(
  params: Any,
  features_BLD: Array,
  samples_BKT: Array,
  advantage_BK: Array,
  *,
  model: captioner.Captioner,
) -> Array:
  """-mean over samples of advantage * log p(sample); see the module doc."""
  log_p_BK = sequence_log_probs(params, features_BLD, samples_BKT, model=model)
  return -jnp.mean(jax.lax.stop_gradient(advantage_BK) * log_p_BK)


def reference_xent(
  params: Any,
  features_BLD: Array,
  references_BRT: Array,
  reference_mask_BR: Array,
  *,
  model: captioner.Captioner,
) -> Array:
  """Minus the mean log p of the real references, each summed over tokens.

  The references' leading <start> is dropped: `sequence_log_probs` feeds it.
  """
  log_p_BR = sequence_log_probs(
    params, features_BLD, references_BRT[:, :, 1:], model=model
  )
  weight_BR = reference_mask_BR.astype(log_p_BR.dtype)
  return -jnp.sum(weight_BR * log_p_BR) / jnp.maximum(jnp.sum(weight_BR), 1.0)


def mixed_loss(
  params: Any,
  batch: Batch,
  samples_BKT: Array,
  advantage_BK: Array,
  *,
  model: captioner.Captioner,
  xent_weight: float,
) -> tuple[Array, Array]:
  """The policy-gradient loss plus xent_weight times `reference_xent`.

  Returns:
    (the loss, the cross-entropy term alone: 0 when xent_weight is 0).
  """
  loss = policy_gradient_loss(
    params, batch['features'], samples_BKT, advantage_BK, model=model
  )
  if not xent_weight:
    return loss, jnp.zeros((), loss.dtype)
  xent = reference_xent(
    params,
    batch['features'],
    batch['references'],
    batch['reference_mask'],
    model=model,
  )
  return loss + xent_weight * xent, xent


def baseline_of(
  reward_BK: Array, greedy_reward_B: Array | None, baseline: str
) -> Array:
  """Each sample's baseline: the greedy caption's reward or the others' mean."""
  if baseline == 'greedy':
    assert greedy_reward_B is not None  # Given with the greedy baseline.
    return jnp.broadcast_to(greedy_reward_B[:, None], reward_BK.shape)
  num_samples = reward_BK.shape[1]
  return (jnp.sum(reward_BK, axis=1, keepdims=True) - reward_BK) / (
    num_samples - 1
  )


def cider_reward(
  candidates_BCT: Array, batch: Batch, doc_freqs: cider.DocumentFrequencies
) -> Array:
  """SCST's reward: each candidate's CIDEr-D against its image's references."""
  return cider.cider_d(
    candidates_BCT, batch['references'], batch['reference_mask'], doc_freqs
  )


def sample_and_score(
  params: Any,
  batch: Batch,
  rng: Array,
  reward_args: Any,
  *,
  model: captioner.Captioner,
  reward_fn: RewardFn,
  num_samples: int,
  baseline: str,
  max_len: int,
) -> dict[str, Array]:
  """K samples per image, their rewards and baselines (no gradient).

  Returns:
    {'samples_BKT', 'reward_BK', 'baseline_BK'}, and 'greedy_reward_B' with
    the greedy baseline.
  """
  params = jax.lax.stop_gradient(params)
  features_BLD = batch['features']
  batch_size = features_BLD.shape[0]
  encoded, h_BU = decoding.encode(model, params, features_BLD)
  step_fn = decoding.model_step_fn(model, params)
  samples = search.temperature_sampling(
    step_fn,
    _repeat(encoded, num_samples),
    _repeat(h_BU, num_samples),
    rng,
    max_len=max_len,
    temperature=1.0,
  )
  candidates_BCT = samples.tokens_BT.reshape(batch_size, num_samples, max_len)
  if baseline == 'greedy':
    greedy = search.greedy_search(step_fn, encoded, h_BU, max_len=max_len)
    # One reward pass scores the samples and the greedy caption together.
    candidates_BCT = jnp.concatenate(
      [candidates_BCT, greedy.tokens_BT[:, None]], axis=1
    )
  scores_BC = reward_fn(candidates_BCT, batch, reward_args)
  out = {
    'samples_BKT': candidates_BCT[:, :num_samples],
    'reward_BK': scores_BC[:, :num_samples],
  }
  greedy_reward_B = None
  if baseline == 'greedy':
    greedy_reward_B = out['greedy_reward_B'] = scores_BC[:, num_samples]
  out['baseline_BK'] = baseline_of(out['reward_BK'], greedy_reward_B, baseline)
  return out


def scst_step(
  state: state_lib.TrainState,
  batch: Batch,
  reward_args: Any,
  *,
  model: captioner.Captioner,
  tx: optax.GradientTransformation,
  num_samples: int,
  baseline: str,
  max_len: int,
  reward_fn: RewardFn = cider_reward,
  xent_weight: float = 0.0,
) -> tuple[state_lib.TrainState, dict[str, Array]]:
  """One SCST step on a batch of images with their references.

  Args:
    state: the train state.
    batch: 'features' (B, L, D), 'references' (B, R, T) token ids and
      'reference_mask' (B, R) (capjax.data.reference_batches).
    reward_args: reward_fn's last argument: for CIDEr-D, the document
      frequencies of the training references.
    model: the Captioner.
    tx: the optimizer.
    num_samples: K, samples per image.
    baseline: 'greedy' or 'mean' (config_checks.CHOICES).
    max_len: the most tokens of a sample, <end> included.
    reward_fn: (candidates (B, C, T), batch, reward_args) -> rewards (B, C).
    xent_weight: the weight of `reference_xent` in the loss (0: none).

  Returns:
    The new state and the batch's metric sums (see `normalize`).
  """
  rng = jax.random.fold_in(state.rng, state.step)
  scored = sample_and_score(
    state.params,
    batch,
    rng,
    reward_args,
    model=model,
    reward_fn=reward_fn,
    num_samples=num_samples,
    baseline=baseline,
    max_len=max_len,
  )
  advantage_BK = scored['reward_BK'] - scored['baseline_BK']
  (loss, xent), grads = jax.value_and_grad(mixed_loss, has_aux=True)(
    state.params,
    batch,
    scored['samples_BKT'],
    advantage_BK,
    model=model,
    xent_weight=xent_weight,
  )
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  metrics = {
    'objective': loss,
    'grad_norm': optax.tree.norm(grads),
    'reward_sum': jnp.sum(scored['reward_BK']),
    'baseline_sum': jnp.sum(scored['baseline_BK']),
    'sample_token_sum': jnp.sum(
      scored['samples_BKT'] != vocab_lib.Vocab.pad_id, dtype=jnp.float32
    ),
    'sample_count': jnp.asarray(advantage_BK.size, jnp.float32),
    'xent_sum': xent * advantage_BK.size,
  }
  return state.replace(
    step=state.step + 1, params=params, opt_state=opt_state
  ), metrics


def normalize(sums: dict[str, Any]) -> dict[str, float]:
  """Means of summed SCST metrics: reward, baseline and sample length."""
  samples = max(float(sums['sample_count']), 1.0)
  return {
    'reward': float(sums['reward_sum']) / samples,
    'baseline': float(sums['baseline_sum']) / samples,
    'sample_length': float(sums['sample_token_sum']) / samples,
    'reference_xent': float(sums['xent_sum']) / samples,
  }


def make_step(
  model: captioner.Captioner, tx: optax.GradientTransformation, config
) -> Any:
  """The config's `scst_step`, its static arguments bound."""
  return functools.partial(
    scst_step,
    model=model,
    tx=tx,
    num_samples=config.scst_samples,
    baseline=config.scst_baseline,
    max_len=decoding.max_caption_tokens(config),
    xent_weight=config.scst_xent_weight,
  )
