"""capjax.model.recurrence: the scan's hand-placed gradient is autodiff's."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from capjax.model import recurrence

B, L, E, U, T = 3, 5, 6, 8, 7


def _random_inputs(seed=0):
  keys = iter(jax.random.split(jax.random.key(seed), 10))
  normal = lambda *shape: jax.random.normal(next(keys), shape) * 0.5
  weights = recurrence.StepWeights(
    query_kernel_UU=normal(U, U),
    query_bias_U=normal(U),
    score_kernel_U1=normal(U, 1),
    context_kernel_E3U=normal(E, 3 * U),
    recurrent_kernel_U3U=normal(U, 3 * U),
    recurrent_bias_3U=normal(3 * U),
  )
  encoded = recurrence.Encoded(
    values_BLE=normal(B, L, E), keys_BLU=normal(B, L, U)
  )
  return weights, encoded, normal(B, T, 3 * U)


def _autodiff_unroll(weights, encoded, token_in_BT3U, carry_gru_state):
  """The same steps scanned with no custom gradient."""

  def body(h_BU, token_in_B3U):
    h_BU, attention_BL = recurrence.step(
      weights, h_BU, token_in_B3U, encoded, carry_gru_state
    )
    return h_BU, (h_BU, attention_BL)

  _, (h_TBU, attention_TBL) = jax.lax.scan(
    body, jnp.zeros((B, U)), jnp.swapaxes(token_in_BT3U, 0, 1)
  )
  return jnp.swapaxes(h_TBU, 0, 1), jnp.swapaxes(attention_TBL, 0, 1)


@pytest.mark.parametrize('carry_gru_state', [True, False])
def test_gradients_equal_autodiff_of_the_plain_scan(carry_gru_state):
  weights, encoded, token_in = _random_inputs()
  # A loss that reads every state and every attention weight unevenly.
  probe = jax.random.normal(jax.random.key(1), (B, T, U))

  def loss(unroll):
    def f(weights, encoded, token_in):
      h_BTU, attention_BTL = unroll(weights, encoded, token_in, carry_gru_state)
      return jnp.sum(h_BTU * probe) + jnp.sum(attention_BTL**2)

    return f

  outputs = recurrence.unroll(weights, encoded, token_in, carry_gru_state)
  expected_outputs = _autodiff_unroll(
    weights, encoded, token_in, carry_gru_state
  )
  jax.tree_util.tree_map(
    np.testing.assert_array_equal, outputs, expected_outputs
  )
  grads = jax.grad(loss(recurrence.unroll), argnums=(0, 1, 2))(
    weights, encoded, token_in
  )
  expected = jax.grad(loss(_autodiff_unroll), argnums=(0, 1, 2))(
    weights, encoded, token_in
  )
  jax.tree_util.tree_map_with_path(
    lambda path, g, e: np.testing.assert_allclose(
      g, e, rtol=1e-5, atol=1e-6, err_msg=jax.tree_util.keystr(path)
    ),
    grads,
    expected,
  )
  # Without a carried state the recurrent kernel multiplies zeros.
  recurrent_grad = np.abs(grads[0].recurrent_kernel_U3U).max()
  assert (recurrent_grad > 0) == carry_gru_state


def test_gradients_under_jit_and_vmap():
  """The custom gradient composes with the transformations training uses."""
  weights, encoded, token_in = _random_inputs()

  def loss(weights, token_in):
    h_BTU, _ = recurrence.unroll(weights, encoded, token_in, True)
    return jnp.sum(jnp.sin(h_BTU))

  per_example = jax.jit(jax.vmap(jax.grad(loss, argnums=1), in_axes=(None, 0)))
  stacked = jnp.stack([token_in, 2 * token_in])
  grads = per_example(weights, stacked)
  for i in range(2):
    np.testing.assert_allclose(
      grads[i],
      jax.grad(loss, argnums=1)(weights, stacked[i]),
      rtol=1e-5,
      atol=1e-6,
    )
