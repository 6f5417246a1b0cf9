"""The decoder's recurrent step and its scan over time, as pure functions.

Names carry their shapes: B batch, L feature positions, E embedding size,
U units, T time steps.

One step is the tutorial's decoder call without the embedding and the head:

  q      = h W2 + b2                          the attention's query (B, U)
  score  = V tanh(keys + q)                   (B, L); keys = W1 x, per image
  a      = softmax(score)                     attention weights (B, L)
  ctx    = sum_l a_l values_l                 context (B, E)
  x      = token_in + ctx Wc                  GRU input; token_in = e Wt + b_x
  hh     = s Wr + br                          s = h (or 0: no carried state)
  z = sigmoid(x_z + hh_z)    r = sigmoid(x_r + hh_r)
  n = tanh(x_n + r * hh_n)   h' = z * s + (1 - z) * n

a GRU with Keras' `reset_after=True` semantics, gates ordered (z, r, n).

`unroll` scans the step over time and has a gradient of its own. Left to
autodiff, the scan's backward pass would add every weight's gradient into an
accumulator at every step: thin matmuls (batch-sized inner dimension) plus a
read and write of each weight-sized accumulator per step. The gradients of
W2, b2, Wc, Wr and br are sums over time of outer products of saved
activations with per-step cotangents, so `unroll` has the backward scan
return those cotangents instead and forms each weight gradient after it, as
one large matmul over all B*T rows. Only V, whose gradient needs the (B, L, U)
tanh that is recomputed inside the step, keeps its accumulator.
"""

import functools

import flax
import jax
import jax.numpy as jnp

Array = jax.Array


@flax.struct.dataclass
class Encoded:
  """Per-image work shared by every decoding step.

  Attributes:
    values_BLE: encoder outputs, the attention's values.
    keys_BLU: W1 applied to the encoder outputs; independent of the step, so
      computed once per image instead of once per token.
  """

  values_BLE: Array
  keys_BLU: Array


@flax.struct.dataclass
class StepWeights:
  """The weights a step reads, in the compute dtype.

  The token half of the GRU's input kernel and its input bias are not here:
  they do not depend on the recurrence and are applied to every token before
  the scan (`token_in`).
  """

  query_kernel_UU: Array  # W2
  query_bias_U: Array  # b2
  score_kernel_U1: Array  # V (no bias: softmax ignores a shift)
  context_kernel_E3U: Array  # Wc, the context half of the GRU input kernel
  recurrent_kernel_U3U: Array  # Wr
  recurrent_bias_3U: Array  # br


def _additive_scores(
  score_kernel_U1: Array, keys_BLU: Array, query_BU: Array
) -> Array:
  """`V tanh(W1 x + W2 h)`, given W1 x and W2 h: scores (B, L)."""
  return (jnp.tanh(keys_BLU + query_BU[:, None, :]) @ score_kernel_U1)[..., 0]


def _attend(
  score_kernel_U1: Array,
  encoded: Encoded,
  query_BU: Array,
  context_tap_BE: Array | float = 0.0,
) -> tuple[Array, Array]:
  """Bahdanau attention: the context (B, E) and the weights (B, L)."""
  # Rematerialised: the backward pass recomputes the (B, L, U) tanh from the
  # keys instead of storing it at every step (8 MB at the tutorial's sizes);
  # the attention's forward and backward then run about 3x faster on a CPU.
  score_BL = jax.checkpoint(_additive_scores)(
    score_kernel_U1, encoded.keys_BLU, query_BU
  )
  # Softmax in float32 even under bfloat16 compute: it normalises over L.
  attention_BL = jax.nn.softmax(score_BL.astype(jnp.float32), axis=-1)
  context_BE = (
    jnp.einsum(
      'bl,ble->be', attention_BL.astype(query_BU.dtype), encoded.values_BLE
    )
    + context_tap_BE
  )
  return context_BE, attention_BL


def _gru_update(state_BU: Array, x_B3U: Array, hh_B3U: Array) -> Array:
  """The gates and the new state from the input and recurrent projections."""
  x_z, x_r, x_n = jnp.split(x_B3U, 3, axis=-1)
  hh_z, hh_r, hh_n = jnp.split(hh_B3U, 3, axis=-1)
  z = jax.nn.sigmoid(x_z + hh_z)
  r = jax.nn.sigmoid(x_r + hh_r)
  n = jnp.tanh(x_n + r * hh_n)
  return z * state_BU + (1.0 - z) * n


def _step(
  weights: StepWeights,
  h_BU: Array,
  token_in_B3U: Array,
  encoded: Encoded,
  carry_gru_state: bool,
  taps: tuple[Array | float, Array | float, Array | float] = (0.0, 0.0, 0.0),
) -> tuple[Array, Array, Array]:
  """One step; the taps are zeros whose cotangents `unroll`'s backward reads.

  Returns the new state (B, U), the attention weights (B, L) and the
  context (B, E).
  """
  query_tap_BU, context_tap_BE, recurrent_tap_B3U = taps
  query_BU = (
    h_BU @ weights.query_kernel_UU + weights.query_bias_U + query_tap_BU
  )
  context_BE, attention_BL = _attend(
    weights.score_kernel_U1, encoded, query_BU, context_tap_BE
  )
  x_B3U = token_in_B3U + context_BE @ weights.context_kernel_E3U
  # The tutorial's decoder resets its GRU at every step: the state reaches
  # the next step only as the attention's query.
  state_BU = h_BU if carry_gru_state else jnp.zeros_like(h_BU)
  hh_B3U = (
    state_BU @ weights.recurrent_kernel_U3U
    + weights.recurrent_bias_3U
    + recurrent_tap_B3U
  )
  return _gru_update(state_BU, x_B3U, hh_B3U), attention_BL, context_BE


def step(
  weights: StepWeights,
  h_BU: Array,
  token_in_B3U: Array,
  encoded: Encoded,
  carry_gru_state: bool,
) -> tuple[Array, Array]:
  """One recurrent step: the new state (B, U) and the attention (B, L)."""
  h_BU, attention_BL, _ = _step(
    weights, h_BU, token_in_B3U, encoded, carry_gru_state
  )
  return h_BU, attention_BL


def _scan(
  weights: StepWeights,
  encoded: Encoded,
  token_in_TB3U: Array,
  taps_T: tuple[Array, Array, Array] | None,
  carry_gru_state: bool,
):
  """The steps over time from the zero state, time-major.

  taps_T: each step's taps, stacked over time (None: no taps).

  Returns (h_TBU, attention_TBL, context_TBE).
  """

  def body(h_BU, inputs):
    token_in_B3U, taps = inputs
    h_BU, attention_BL, context_BE = _step(
      weights,
      h_BU,
      token_in_B3U,
      encoded,
      carry_gru_state,
      *([taps] if taps is not None else []),
    )
    return h_BU, (h_BU, attention_BL, context_BE)

  _, batch, units3 = token_in_TB3U.shape
  h0_BU = jnp.zeros((batch, units3 // 3), token_in_TB3U.dtype)
  _, outputs = jax.lax.scan(body, h0_BU, (token_in_TB3U, taps_T))
  return outputs


def _zero_taps(
  encoded: Encoded, token_in_TB3U: Array
) -> tuple[Array, Array, Array]:
  """Zeros added to the query, the context and hh at every step."""
  steps, batch, units3 = token_in_TB3U.shape
  zeros = lambda n: jnp.zeros((steps, batch, n), token_in_TB3U.dtype)
  return (
    zeros(units3 // 3),
    zeros(encoded.values_BLE.shape[-1]),
    zeros(units3),
  )


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _unroll_time_major(
  weights: StepWeights,
  encoded: Encoded,
  token_in_TB3U: Array,
  carry_gru_state: bool,
) -> tuple[Array, Array]:
  h_TBU, attention_TBL, _ = _scan(
    weights, encoded, token_in_TB3U, None, carry_gru_state
  )
  return h_TBU, attention_TBL


def _unroll_forward(weights, encoded, token_in_TB3U, carry_gru_state):
  """The scan, differentiable in all but what the backward pass hoists."""

  def scan_with_taps(score_kernel_U1, keys_BLU, token_in_TB3U, taps):
    # The other weights and the values are closed over, constants to
    # jax.vjp: no accumulators for them in the backward scan.
    h_TBU, attention_TBL, context_TBE = _scan(
      weights.replace(score_kernel_U1=score_kernel_U1),
      encoded.replace(keys_BLU=keys_BLU),
      token_in_TB3U,
      taps,
      carry_gru_state,
    )
    return (h_TBU, attention_TBL), (h_TBU, attention_TBL, context_TBE)

  outputs, scan_vjp, saved = jax.vjp(
    scan_with_taps,
    weights.score_kernel_U1,
    encoded.keys_BLU,
    token_in_TB3U,
    _zero_taps(encoded, token_in_TB3U),
    has_aux=True,
  )
  return outputs, (scan_vjp, *saved)


def _outer_sum(a_TBM: Array, b_TBN: Array, dtype) -> Array:
  """sum over t, b of a ⊗ b: one (M, N) matmul over all T*B rows."""
  return jnp.einsum(
    'tbm,tbn->mn', a_TBM, b_TBN, preferred_element_type=jnp.float32
  ).astype(dtype)


def _unroll_backward(carry_gru_state, residuals, cotangents):
  scan_vjp, h_TBU, attention_TBL, context_TBE = residuals
  (
    d_score_kernel_U1,
    d_keys_BLU,
    d_token_in_TB3U,
    (d_query_TBU, d_context_TBE, d_recurrent_TB3U),
  ) = scan_vjp(cotangents)
  # Step t reads the state h_{t-1}, the zero state at t = 0.
  previous_TBU = jnp.concatenate([jnp.zeros_like(h_TBU[:1]), h_TBU[:-1]])
  dtype = h_TBU.dtype
  d_weights = StepWeights(
    query_kernel_UU=_outer_sum(previous_TBU, d_query_TBU, dtype),
    query_bias_U=jnp.sum(d_query_TBU, axis=(0, 1)),
    score_kernel_U1=d_score_kernel_U1,
    # token_in enters x unchanged, so its cotangent is x's.
    context_kernel_E3U=_outer_sum(context_TBE, d_token_in_TB3U, dtype),
    recurrent_kernel_U3U=(
      _outer_sum(previous_TBU, d_recurrent_TB3U, dtype)
      if carry_gru_state
      else jnp.zeros((h_TBU.shape[-1], d_recurrent_TB3U.shape[-1]), dtype)
    ),
    recurrent_bias_3U=jnp.sum(d_recurrent_TB3U, axis=(0, 1)),
  )
  # context_t = sum_l a_tl values_l: the values' gradient sums a ⊗ d_context.
  d_values_BLE = jnp.einsum(
    'tbl,tbe->ble',
    attention_TBL.astype(dtype),
    d_context_TBE,
    preferred_element_type=jnp.float32,
  ).astype(dtype)
  d_encoded = Encoded(values_BLE=d_values_BLE, keys_BLU=d_keys_BLU)
  return d_weights, d_encoded, d_token_in_TB3U


_unroll_time_major.defvjp(_unroll_forward, _unroll_backward)


def unroll(
  weights: StepWeights,
  encoded: Encoded,
  token_in_BT3U: Array,
  carry_gru_state: bool,
) -> tuple[Array, Array]:
  """`step` over time from the zero state.

  Returns the states (B, T, U) and the attention weights (B, T, L).
  """
  h_TBU, attention_TBL = _unroll_time_major(
    weights, encoded, jnp.swapaxes(token_in_BT3U, 0, 1), carry_gru_state
  )
  return jnp.swapaxes(h_TBU, 0, 1), jnp.swapaxes(attention_TBL, 0, 1)
