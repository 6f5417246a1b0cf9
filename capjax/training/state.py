"""The train state and the optimizer that updates it."""

import functools
from typing import Any, TYPE_CHECKING

import flax
import jax
import jax.numpy as jnp
import optax

from capjax.model import captioner

# Configs are only read here: ml_collections, absent on hosts that run the
# model alone, is needed by type checkers only.
if TYPE_CHECKING:
  import ml_collections


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  opt_state: Any
  # Raw key data: checkpoints store it as a plain uint32 array.
  rng: jax.Array

  if TYPE_CHECKING:
    # Made by flax.struct.dataclass, which type checkers do not see.
    def replace(self, **changes: Any) -> 'TrainState': ...


def make_optimizer(
  config: 'ml_collections.ConfigDict',
) -> optax.GradientTransformation:
  """Adam with the configured schedule and optional global-norm clipping.

  The optimizer state has one layout whatever the schedule and clipping (a
  schedule even when constant, a clip even when off), so a run can resume
  with either changed, e.g. clipping switched on after a NaN.
  """
  if config.schedule == 'constant':
    learning_rate = optax.constant_schedule(config.learning_rate)
  else:  # 'warmup_cosine', the other of config_checks.CHOICES['schedule']
    learning_rate = optax.warmup_cosine_decay_schedule(
      init_value=0.0,
      peak_value=config.learning_rate,
      warmup_steps=config.warmup_steps,
      decay_steps=max(config.num_train_steps, config.warmup_steps + 1),
    )
  return adam(
    learning_rate,
    b1=config.adam_b1,
    b2=config.adam_b2,
    eps=config.adam_eps,
    grad_clip_norm=config.grad_clip_norm,
  )


def adam(
  learning_rate: float | optax.Schedule,
  *,
  b1: float,
  b2: float,
  eps: float,
  grad_clip_norm: float,
) -> optax.GradientTransformation:
  """Adam after global-norm clipping (grad_clip_norm 0: a clip that never
  clips, so that the state's layout stays the same)."""
  return optax.chain(
    optax.clip_by_global_norm(grad_clip_norm or float('inf')),
    optax.adam(learning_rate, b1=b1, b2=b2, eps=eps),
  )


def init_params(
  model: captioner.Captioner, rng: jax.Array, feature_shape_LD: tuple[int, int]
) -> Any:
  """Fresh parameters of a model for features of shape (L, D)."""
  features = jnp.zeros((1, *feature_shape_LD), jnp.float32)
  tokens = jnp.zeros((1, 2), jnp.int32)
  return model.init(rng, features, tokens)['params']


def abstract_params(
  model: captioner.Captioner, feature_shape_LD: tuple[int, int]
) -> Any:
  """The shapes and dtypes of a model's parameters, computing nothing."""
  return jax.eval_shape(
    functools.partial(init_params, model, feature_shape_LD=feature_shape_LD),
    jax.random.PRNGKey(0),
  )


def create_train_state(
  model: captioner.Captioner,
  tx: optax.GradientTransformation,
  feature_shape_LD: tuple[int, int],
  seed: int,
) -> TrainState:
  """Fresh parameters and optimizer state."""
  init_rng, train_rng = jax.random.split(jax.random.PRNGKey(seed))
  params = init_params(model, init_rng, feature_shape_LD)
  return TrainState(
    step=jnp.array(0, jnp.int32),
    params=params,
    opt_state=tx.init(params),
    rng=train_rng,
  )
