"""The captioning model: dense encoder, Bahdanau attention and a GRU decoder.

Names carry their shapes: B batch, L feature positions, D feature size,
E embedding size, U units, T time steps, V vocabulary size.

The model follows the TensorFlow tutorial's equations exactly (see
docs/design.md) and is organised so that one recurrent step serves both
teacher-forced training (scanned over time) and decoding (once per token):

  encode(features_BLD)            -> Encoded(values_BLE, keys_BLU), per image
  token_inputs(tokens_BT)         -> GRU input projection of the embeddings
  step(h_BU, token_in_B3U, enc)   -> (h_BU, attention_BL)            recurrent
  head(h_BTU)                     -> logits                          per state

Everything that does not depend on the recurrence (W1 on the features, the
embedding half of the GRU input projection, fc1 and fc2) runs outside the
scan, batched over all time steps. The step's equations and the scan's
gradient are capjax.model.recurrence's; the modules here hold the parameters.
"""

from typing import Any, TYPE_CHECKING

import flax.linen as nn
import jax
import jax.numpy as jnp

from capjax.model import recurrence

# Configs are only read here: ml_collections, absent on hosts that run the
# model alone, is needed by type checkers only.
if TYPE_CHECKING:
  import ml_collections

Array = jax.Array
Dtype = Any

# The tutorial's Keras layers use Glorot-uniform kernels and zero biases.
_kernel_init = nn.initializers.glorot_uniform()


def _shifted_uniform(scale: float):
  """Uniform on [-scale/2, scale/2): Keras' Embedding default for scale 0.1."""
  base = nn.initializers.uniform(scale=scale)

  def init(key, shape, dtype=jnp.float32):
    return base(key, shape, dtype) - scale / 2

  return init


class Linear(nn.Module):
  """A dense layer's kernel (and bias), created in setup.

  The recurrence reads its weights as arrays (capjax.model.recurrence), so
  they must exist before anything calls them, unlike nn.Dense's, which are
  created by the first call. The names are nn.Dense's.
  """

  in_features: int
  features: int
  use_bias: bool = True

  def setup(self):
    self.kernel = self.param(
      'kernel', _kernel_init, (self.in_features, self.features)
    )
    if self.use_bias:
      self.bias = self.param('bias', nn.initializers.zeros, (self.features,))


class Encoder(nn.Module):
  """`relu(Dense_E(features))`, the tutorial's CNN_Encoder."""

  embedding_dim: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, features_BLD: Array) -> Array:
    x = nn.Dense(
      self.embedding_dim, dtype=self.dtype, kernel_init=_kernel_init, name='fc'
    )(features_BLD)
    return nn.relu(x)


class BahdanauAttention(nn.Module):
  """Additive attention's weights: `a = softmax(V tanh(W1 x + W2 h))`.

  W1 runs once per image (`keys`); W2 and V run at every step, in
  capjax.model.recurrence.
  """

  units: int
  dtype: Dtype = jnp.float32

  def setup(self):
    self.W1 = nn.Dense(
      self.units, dtype=self.dtype, kernel_init=_kernel_init, name='W1'
    )
    self.W2 = Linear(self.units, self.units, name='W2')
    # The tutorial's V has a bias, but softmax ignores a shift shared by all
    # positions: its true gradient is 0, and Adam would only amplify rounding
    # noise into random steps. capjax.convert drops it.
    self.V = Linear(self.units, 1, use_bias=False, name='V')

  def keys(self, values_BLE: Array) -> Array:
    """W1 x: depends only on the image, so it is computed once."""
    return self.W1(values_BLE)


class GRUCell(nn.Module):
  """The weights of a GRU with Keras `reset_after=True` semantics.

  The update itself is capjax.model.recurrence's. The parameters are
  Keras' own, one for one. Flax's GRUCell folds b_hz and b_hr into b_x,
  which leaves the forward pass unchanged but not training:
  Adam scales each parameter's step separately, so two biases that add up move
  twice as far as their fold. The input kernel is split by rows into its
  context and token halves (Adam is elementwise, so a split changes nothing)
  so that the token half runs on all time steps at once, outside the scan.
  """

  units: int
  context_dim: int
  token_dim: int
  dtype: Dtype = jnp.float32

  def setup(self):
    u3 = 3 * self.units
    self.context_kernel = self.param(
      'context_kernel', _kernel_init, (self.context_dim, u3)
    )
    self.token_kernel = self.param(
      'token_kernel', _kernel_init, (self.token_dim, u3)
    )
    self.input_bias = self.param('input_bias', nn.initializers.zeros, (u3,))
    # The tutorial asks for a Glorot-uniform recurrent kernel.
    self.recurrent_kernel = self.param(
      'recurrent_kernel', _kernel_init, (self.units, u3)
    )
    self.recurrent_bias = self.param(
      'recurrent_bias', nn.initializers.zeros, (u3,)
    )

  def token_inputs(self, embedded_BTE: Array) -> Array:
    """The token half of the input projection plus b_x: (B, T, 3U)."""
    kernel = self.token_kernel.astype(self.dtype)
    return embedded_BTE.astype(self.dtype) @ kernel + self.input_bias.astype(
      self.dtype
    )


class Captioner(nn.Module):
  """Show, Attend and Tell captioner (the tutorial's encoder + RNN_Decoder).

  Attributes:
    vocab_size: V, including <pad>=0.
    embedding_dim: E, the encoder's output size and the token embedding size.
    units: U, the GRU and attention size.
    carry_gru_state: feed each step's GRU its previous state. False is the
      tutorial's decoder: the GRU starts from zeros at every step and the
      state reaches the next step only as the attention query.
    dropout_rate: dropout on token embeddings and on decoder outputs.
    dtype: compute dtype; parameters are always float32.
  """

  vocab_size: int
  embedding_dim: int = 256
  units: int = 512
  carry_gru_state: bool = True
  dropout_rate: float = 0.0
  dtype: Dtype = jnp.float32

  def setup(self):
    self.encoder = Encoder(self.embedding_dim, dtype=self.dtype)
    self.attention = BahdanauAttention(self.units, dtype=self.dtype)
    self.embedding = nn.Embed(
      self.vocab_size,
      self.embedding_dim,
      embedding_init=_shifted_uniform(0.1),
      name='embedding',
    )
    self.gru = GRUCell(
      self.units,
      context_dim=self.embedding_dim,
      token_dim=self.embedding_dim,
      dtype=self.dtype,
    )
    self.fc1 = nn.Dense(self.units, dtype=self.dtype, kernel_init=_kernel_init)
    self.fc2 = nn.Dense(
      self.vocab_size, dtype=self.dtype, kernel_init=_kernel_init
    )
    self.dropout = nn.Dropout(self.dropout_rate)

  def encode(self, features_BLD: Array) -> recurrence.Encoded:
    """Encoder outputs and attention keys for a batch of feature grids."""
    values_BLE = self.encoder(features_BLD.astype(self.dtype))
    return recurrence.Encoded(
      values_BLE=values_BLE, keys_BLU=self.attention.keys(values_BLE)
    )

  def initial_state(self, batch_size: int) -> Array:
    """The zero state the tutorial starts every caption from (B, U)."""
    return jnp.zeros((batch_size, self.units), self.dtype)

  def token_inputs(self, tokens_BT: Array, deterministic: bool = True) -> Array:
    """Embeds tokens and applies the token half of the GRU input projection."""
    embedded_BTE = self.embedding(tokens_BT).astype(self.dtype)
    embedded_BTE = self.dropout(embedded_BTE, deterministic=deterministic)
    return self.gru.token_inputs(embedded_BTE)

  def step_weights(self) -> recurrence.StepWeights:
    """The weights of the recurrent step, cast to the compute dtype."""
    weights = recurrence.StepWeights(
      query_kernel_UU=self.attention.W2.kernel,
      query_bias_U=self.attention.W2.bias,
      score_kernel_U1=self.attention.V.kernel,
      context_kernel_E3U=self.gru.context_kernel,
      recurrent_kernel_U3U=self.gru.recurrent_kernel,
      recurrent_bias_3U=self.gru.recurrent_bias,
    )
    return jax.tree_util.tree_map(lambda w: w.astype(self.dtype), weights)

  def step(
    self, h_BU: Array, token_in_B3U: Array, encoded: recurrence.Encoded
  ) -> tuple[Array, Array]:
    """One recurrent step: attend with query h, then update the GRU.

    Returns the new state (B, U) and the attention weights (B, L).
    """
    return recurrence.step(
      self.step_weights(),
      h_BU.astype(self.dtype),
      token_in_B3U,
      encoded,
      self.carry_gru_state,
    )

  def head(self, h_xU: Array, deterministic: bool = True) -> Array:
    """fc2(fc1(h)), no activation between (as the tutorial); float32 logits."""
    h_xU = self.dropout(h_xU, deterministic=deterministic)
    return self.fc2(self.fc1(h_xU)).astype(jnp.float32)

  def decode_step(
    self, h_BU: Array, token_B: Array, encoded: recurrence.Encoded
  ) -> tuple[Array, Array, Array]:
    """The tutorial decoder's call: (logits (B, V), state, attention (B, L))."""
    token_in_B3U = self.token_inputs(token_B[:, None])[:, 0]
    h_BU, attention_BL = self.step(h_BU, token_in_B3U, encoded)
    return self.head(h_BU), h_BU, attention_BL

  def unroll(
    self, encoded: recurrence.Encoded, token_in_BT3U: Array
  ) -> tuple[Array, Array]:
    """`step` over time from the zero state: states_BTU, attention_BTL."""
    return recurrence.unroll(
      self.step_weights(), encoded, token_in_BT3U, self.carry_gru_state
    )

  def __call__(
    self, features_BLD: Array, tokens_BT: Array, deterministic: bool = True
  ) -> tuple[Array, Array]:
    """Teacher forcing: predicts tokens[:, 1:] from tokens[:, :-1].

    Args:
      features_BLD: image feature grids.
      tokens_BT: captions starting with <start>, padded with 0.
      deterministic: False enables dropout (needs a 'dropout' RNG).

    Returns:
      logits (B, T-1, V) in float32 and attention weights (B, T-1, L).
    """
    if features_BLD.ndim != 3 or tokens_BT.ndim != 2:
      raise ValueError(
        f'expected features (B, L, D) and tokens (B, T), got shapes '
        f'{features_BLD.shape} and {tokens_BT.shape}'
      )
    if features_BLD.shape[0] != tokens_BT.shape[0]:
      raise ValueError(
        f'features and tokens disagree on the batch size: '
        f'{features_BLD.shape[0]} vs {tokens_BT.shape[0]}'
      )
    encoded = self.encode(features_BLD)
    token_in_BT3U = self.token_inputs(tokens_BT[:, :-1], deterministic)
    h_BTU, attention_BTL = self.unroll(encoded, token_in_BT3U)
    return self.head(h_BTU, deterministic), attention_BTL


def from_config(
  config: 'ml_collections.ConfigDict', vocab_size: int
) -> Captioner:
  """The Captioner a (checked: capjax.config_checks) config describes."""
  return Captioner(
    vocab_size=vocab_size,
    embedding_dim=config.embedding_dim,
    units=config.units,
    carry_gru_state=config.carry_gru_state,
    dropout_rate=config.dropout_rate,
    dtype=jnp.dtype(config.dtype),
  )
