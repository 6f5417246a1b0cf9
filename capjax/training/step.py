"""The pure train and evaluation steps, jitted by the training loop."""

from typing import Any

import jax
import optax

from capjax.model import captioner
from capjax.model import losses
from capjax.training import state as state_lib

Batch = dict[str, jax.Array]


def train_step(
  state: state_lib.TrainState,
  batch: Batch,
  *,
  model: captioner.Captioner,
  tx: optax.GradientTransformation,
  attention_penalty: float,
  token_normalizer: float | None = None,
) -> tuple[state_lib.TrainState, dict[str, jax.Array]]:
  """One optimisation step on the global loss of a batch.

  token_normalizer: see capjax.model.losses.caption_loss (None: the mean
  over the batch's tokens).

  Returns the new state and the batch's metric sums (see capjax.model.losses).
  """
  dropout_rng = jax.random.fold_in(state.rng, state.step)

  def loss_fn(params):
    logits, attention = model.apply(
      {'params': params},
      batch['features'],
      batch['tokens'],
      deterministic=False,
      rngs={'dropout': dropout_rng},
    )
    return losses.caption_loss(
      logits,
      attention,
      batch['tokens'][:, 1:],
      attention_penalty,
      token_normalizer,
    )

  (loss, sums), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  metrics = dict(sums, objective=loss, grad_norm=optax.tree.norm(grads))
  return state.replace(
    step=state.step + 1, params=params, opt_state=opt_state
  ), metrics


def eval_step(
  params: Any, batch: Batch, *, model: captioner.Captioner
) -> dict[str, jax.Array]:
  """Metric sums of a batch; all-padding rows (a short last batch) count 0."""
  logits, _ = model.apply(
    {'params': params}, batch['features'], batch['tokens']
  )
  return losses.cross_entropy_sums(logits, batch['tokens'][:, 1:])
