"""Search over a step function: greedy, temperature sampling and beam search.

Each decoder is one `lax.while_loop` around a step closure

  step_fn(state_xU, token_x, encoded) -> (logits_xV, state_xU, attention_xL)

where x counts the sequences decoded together (B, or B * K in beam search)
and `encoded` holds the per-image inputs (a pytree with leading axis x), passed
unchanged to every step. `decoding.model_step_fn` makes the closure from the
Captioner's own `decode_step`, the step that training scans, so training and
decoding cannot drift apart; the encoder and W1 run once per image, before
the loop. Tests pass fake closures whose answers are known.

Every sequence starts from <start>. It is finished by <end>, or cut at
`max_len` tokens when <end> never comes (a cut sequence is still a caption:
`Vocab.decode` turns it into its words). Positions after <end> hold <pad> (0).
<pad> and <start> are never generated: no caption contains them, and ruling
them out keeps `tokens != 0` equal to "generated".

Names carry shapes: B batch, K beams, T = max_len, L positions, V vocabulary.
"""

from collections.abc import Callable
from typing import Any

import flax
import jax
from jax import lax
import jax.numpy as jnp

from capjax import tokens

Array = jax.Array
StepFn = Callable[[Any, Array, Any], tuple[Array, Any, Array]]

_PAD = tokens.PAD_ID
_START = tokens.START_ID
_END = tokens.END_ID


@flax.struct.dataclass
class Captions:
  """One decoded caption per image.

  Attributes:
    tokens_BT: int32 generated ids: words, then <end> if it came, then <pad>.
    lengths_B: int32 number of generated tokens, <end> included.
    attention_BTL: float32 attention weights behind each generated token;
      zero after the last one.
    log_prob_B: float32 log-probability of the generated tokens under the
      model (temperature 1, <pad> and <start> excluded).
  """

  tokens_BT: Array
  lengths_B: Array
  attention_BTL: Array
  log_prob_B: Array


@flax.struct.dataclass
class Beams:
  """The K best hypotheses per image, best first.

  Attributes:
    tokens_BKT, lengths_BK, attention_BKTL, log_prob_BK: as in `Captions`.
    score_BK: the ranking score, log_prob / length_penalty(length, alpha);
      -inf marks an empty slot (fewer than K hypotheses exist).
  """

  tokens_BKT: Array
  lengths_BK: Array
  attention_BKTL: Array
  log_prob_BK: Array
  score_BK: Array

  def best(self) -> Captions:
    """The top hypothesis of each image."""
    return Captions(
      tokens_BT=self.tokens_BKT[:, 0],
      lengths_B=self.lengths_BK[:, 0],
      attention_BTL=self.attention_BKTL[:, 0],
      log_prob_B=self.log_prob_BK[:, 0],
    )


def token_log_probs(logits_xV: Array) -> Array:
  """Log-softmax over the tokens a caption may contain (not <pad>, <start>)."""
  banned_V = (
    jnp.zeros(logits_xV.shape[-1], bool).at[jnp.array([_PAD, _START])].set(True)
  )
  logits_xV = jnp.where(banned_V, -jnp.inf, logits_xV.astype(jnp.float32))
  return jax.nn.log_softmax(logits_xV, axis=-1)


def length_penalty(length: Array, alpha: float | Array) -> Array:
  """GNMT's ((5 + length) / 6) ** alpha; 1 for alpha = 0 (no normalisation)."""
  return ((5.0 + jnp.asarray(length, jnp.float32)) / 6.0) ** alpha


def _check_max_len(max_len: int) -> None:
  if max_len < 1:
    raise ValueError(f'max_len must be >= 1, got {max_len}')


def _batch_size(state: Any) -> int:
  return jax.tree_util.tree_leaves(state)[0].shape[0]


def _num_positions(
  step_fn: StepFn, encoded: Any, state: Any, token_x: Array
) -> int:
  """L, from the shapes the step returns (nothing is computed)."""
  _, _, attention = jax.eval_shape(step_fn, state, token_x, encoded)
  return attention.shape[-1]


# --- Greedy search and sampling: one token per sequence and step --------------


@flax.struct.dataclass
class _SequentialState:
  t: Array  # the position written next
  token_B: Array  # the last token, fed to the next step
  state: Any
  done_B: Array
  tokens_BT: Array
  attention_BTL: Array
  log_prob_B: Array


def _sequential_search(
  step_fn: StepFn,
  encoded: Any,
  state: Any,
  *,
  max_len: int,
  choose_fn: Callable[[Array, Array], Array],
) -> Captions:
  """Extends every sequence by the token `choose_fn(log_probs_BV, t)` picks."""
  _check_max_len(max_len)
  batch_size = _batch_size(state)
  start_B = jnp.full((batch_size,), _START, jnp.int32)
  num_positions = _num_positions(step_fn, encoded, state, start_B)

  def sequential_cond_fn(s: _SequentialState) -> Array:
    return (s.t < max_len) & ~jnp.all(s.done_B)

  def sequential_body_fn(s: _SequentialState) -> _SequentialState:
    logits_BV, state, attention_BL = step_fn(s.state, s.token_B, encoded)
    log_probs_BV = token_log_probs(logits_BV)
    live_B = ~s.done_B
    token_B = jnp.where(live_B, choose_fn(log_probs_BV, s.t), _PAD)
    token_log_prob_B = jnp.take_along_axis(
      log_probs_BV, token_B[:, None], axis=-1
    )[:, 0]
    attention_BL = jnp.where(
      live_B[:, None], attention_BL.astype(jnp.float32), 0.0
    )
    return _SequentialState(
      t=s.t + 1,
      token_B=token_B,
      state=state,
      done_B=s.done_B | (token_B == _END),
      tokens_BT=s.tokens_BT.at[:, s.t].set(token_B),
      attention_BTL=s.attention_BTL.at[:, s.t].set(attention_BL),
      log_prob_B=s.log_prob_B + jnp.where(live_B, token_log_prob_B, 0.0),
    )

  init = _SequentialState(
    t=jnp.array(0, jnp.int32),
    token_B=start_B,
    state=state,
    done_B=jnp.zeros((batch_size,), bool),
    tokens_BT=jnp.zeros((batch_size, max_len), jnp.int32),
    attention_BTL=jnp.zeros((batch_size, max_len, num_positions), jnp.float32),
    log_prob_B=jnp.zeros((batch_size,), jnp.float32),
  )
  s = lax.while_loop(sequential_cond_fn, sequential_body_fn, init)
  return Captions(
    tokens_BT=s.tokens_BT,
    lengths_B=jnp.sum(s.tokens_BT != _PAD, axis=1, dtype=jnp.int32),
    attention_BTL=s.attention_BTL,
    log_prob_B=s.log_prob_B,
  )


def greedy_search(
  step_fn: StepFn, encoded: Any, state: Any, *, max_len: int
) -> Captions:
  """The most likely token at every step, until <end> or max_len.

  Args:
    step_fn: see the module docstring.
    encoded: per-image inputs of the step, leading axis B.
    state: the initial decoder state, a pytree with leading axis B.
    max_len: the most tokens generated per sequence, <end> included.
  """
  return _sequential_search(
    step_fn,
    encoded,
    state,
    max_len=max_len,
    choose_fn=lambda log_probs_BV, t: jnp.argmax(log_probs_BV, axis=-1),
  )


def temperature_sampling(
  step_fn: StepFn,
  encoded: Any,
  state: Any,
  rng: Array,
  *,
  max_len: int,
  temperature: float | Array = 1.0,
) -> Captions:
  """Draws each token from softmax(logits / temperature).

  Step t draws with `jax.random.fold_in(rng, t)`, one draw per sequence, so a
  given rng gives the same captions every time.
  """
  if isinstance(temperature, (int, float)) and temperature <= 0:
    raise ValueError(
      f'temperature must be > 0, got {temperature}; greedy '
      'search is the limit of temperature 0'
    )

  def choose_fn(log_probs_BV, t):
    return jax.random.categorical(
      jax.random.fold_in(rng, t), log_probs_BV / temperature, axis=-1
    )

  return _sequential_search(
    step_fn, encoded, state, max_len=max_len, choose_fn=choose_fn
  )


# --- Beam search --------------------------------------------------------------


@flax.struct.dataclass
class _BeamState:
  t: Array
  # Alive hypotheses (no <end> yet), best first.
  alive_token_BK: Array  # the last token, fed to the next step
  alive_state: Any  # decoder state, leading axis B * K
  alive_tokens_BKT: Array
  alive_attention_BKTL: Array
  alive_log_prob_BK: Array
  # Finished hypotheses, best first.
  finished_tokens_BKT: Array
  finished_attention_BKTL: Array
  finished_log_prob_BK: Array
  finished_score_BK: Array


def _take(x_BK: Array, index_BJ: Array) -> Array:
  """x[b, index[b, j]] for arrays with any trailing axes: (B, J, ...)."""
  index = index_BJ.reshape(index_BJ.shape + (1,) * (x_BK.ndim - 2))
  return jnp.take_along_axis(x_BK, index, axis=1)


def _top_k(score_BN: Array, k: int, *arrays_BN: Array) -> tuple[Array, ...]:
  """The k best entries (stable: ties keep the lower index) of each array."""
  score_Bk, index_Bk = lax.top_k(score_BN, k)
  return (score_Bk,) + tuple(_take(x, index_Bk) for x in arrays_BN)


def beam_search(
  step_fn: StepFn,
  encoded: Any,
  state: Any,
  *,
  max_len: int,
  beam_size: int,
  alpha: float | Array = 0.0,
) -> Beams:
  """The K best captions found by beam search, ranked by normalised score.

  Each step extends the K alive hypotheses of an image by every token and
  keeps the 2K best extensions: those ending in <end> among the first K
  become finished hypotheses (an <end> ranked lower would have fallen off a
  beam of K, which makes beam size 1 exactly greedy search), the K best of
  the others stay alive. A hypothesis scores log_prob / length_penalty(length,
  alpha). The loop stops at max_len, or once no alive hypothesis can beat the
  K-th finished one: log-probabilities only fall as tokens are added and the
  penalty only grows, so lp / length_penalty(max_len) bounds an alive
  hypothesis' final score. Hypotheses still alive then, cut at max_len, rank
  with the finished ones (ties go to the finished).

  Args:
    step_fn: see the module docstring.
    encoded: per-image inputs of the step, leading axis B; repeated K times
      here, never reordered (beams never leave their image).
    state: the initial decoder state, leading axis B.
    max_len: the most tokens per hypothesis, <end> included.
    beam_size: K >= 1.
    alpha: length normalisation strength >= 0 (0: raw log-probabilities;
      GNMT used 0.6 to 1).

  Returns:
    Beams (B, K, ...), best first.
  """
  _check_max_len(max_len)
  if beam_size < 1:
    raise ValueError(f'beam_size must be >= 1, got {beam_size}')
  if isinstance(alpha, (int, float)) and alpha < 0:
    raise ValueError(f'alpha must be >= 0, got {alpha}')
  k = beam_size
  b = _batch_size(state)
  repeat = lambda x: jnp.repeat(x, k, axis=0)
  encoded = jax.tree_util.tree_map(repeat, encoded)
  state = jax.tree_util.tree_map(repeat, state)
  start_BK = jnp.full((b, k), _START, jnp.int32)
  num_positions = _num_positions(
    step_fn, encoded, state, start_BK.reshape(b * k)
  )
  # Rows of the flattened (B * K) state that hold image b's beams.
  row_B1 = jnp.arange(b)[:, None] * k
  max_penalty = length_penalty(jnp.asarray(max_len), alpha)

  def beam_cond_fn(s: _BeamState) -> Array:
    best_possible_B = s.alive_log_prob_BK[:, 0] / max_penalty
    settled_B = s.finished_score_BK[:, -1] >= best_possible_B
    return (s.t < max_len) & ~jnp.all(settled_B)

  def beam_body_fn(s: _BeamState) -> _BeamState:
    logits_xV, state, attention_xL = step_fn(
      s.alive_state, s.alive_token_BK.reshape(b * k), encoded
    )
    log_probs_BKV = token_log_probs(logits_xV).reshape(b, k, -1)
    vocab_size = log_probs_BKV.shape[-1]
    attention_BKL = attention_xL.astype(jnp.float32).reshape(b, k, -1)
    # One <end> per beam: at most K of the 2K best extensions end.
    candidates_BN = (s.alive_log_prob_BK[..., None] + log_probs_BKV).reshape(
      b, k * vocab_size
    )
    # The barrier keeps XLA from merging the [:, :k] slices below into
    # top_k's own, which makes XLA:CPU sort all K * V candidates instead of
    # selecting 2K of them (about 7x slower at the tutorial's sizes).
    log_prob_BC, index_BC = lax.optimization_barrier(
      lax.top_k(candidates_BN, 2 * k)
    )
    parent_BC, token_BC = jnp.divmod(index_BC, vocab_size)
    ended_BC = token_BC == _END

    def extend(parent_BJ, token_BJ):
      """Parents' tokens and attention with this step's appended."""
      tokens_BJT = (
        _take(s.alive_tokens_BKT, parent_BJ).at[:, :, s.t].set(token_BJ)
      )
      attention_BJTL = (
        _take(s.alive_attention_BKTL, parent_BJ)
        .at[:, :, s.t]
        .set(_take(attention_BKL, parent_BJ))
      )
      return tokens_BJT, attention_BJTL

    # Alive: the K best extensions that did not end.
    alive_log_prob_BK, parent_BK, token_BK = _top_k(
      jnp.where(ended_BC, -jnp.inf, log_prob_BC), k, parent_BC, token_BC
    )
    alive_tokens_BKT, alive_attention_BKTL = extend(parent_BK, token_BK)
    alive_state = jax.tree_util.tree_map(
      lambda x: x[(row_B1 + parent_BK).reshape(-1)], state
    )

    # Finished: the earlier ones and the extensions ending in the top K.
    end_log_prob_BK = jnp.where(ended_BC[:, :k], log_prob_BC[:, :k], -jnp.inf)
    end_tokens_BKT, end_attention_BKTL = extend(
      parent_BC[:, :k], token_BC[:, :k]
    )
    end_score_BK = end_log_prob_BK / length_penalty(s.t + 1, alpha)
    concat = lambda x, y: jnp.concatenate([x, y], axis=1)
    (
      finished_score_BK,
      finished_log_prob_BK,
      finished_tokens_BKT,
      finished_attention_BKTL,
    ) = _top_k(
      concat(s.finished_score_BK, end_score_BK),
      k,
      concat(s.finished_log_prob_BK, end_log_prob_BK),
      concat(s.finished_tokens_BKT, end_tokens_BKT),
      concat(s.finished_attention_BKTL, end_attention_BKTL),
    )
    return _BeamState(
      t=s.t + 1,
      alive_token_BK=token_BK,
      alive_state=alive_state,
      alive_tokens_BKT=alive_tokens_BKT,
      alive_attention_BKTL=alive_attention_BKTL,
      alive_log_prob_BK=alive_log_prob_BK,
      finished_tokens_BKT=finished_tokens_BKT,
      finished_attention_BKTL=finished_attention_BKTL,
      finished_log_prob_BK=finished_log_prob_BK,
      finished_score_BK=finished_score_BK,
    )

  # Only the first beam of an image starts alive, so that the K copies of
  # <start> do not yield K copies of every hypothesis.
  first_BK = jnp.arange(k)[None, :] == 0
  no_scores_BK = jnp.full((b, k), -jnp.inf, jnp.float32)
  no_tokens_BKT = jnp.zeros((b, k, max_len), jnp.int32)
  no_attention_BKTL = jnp.zeros((b, k, max_len, num_positions), jnp.float32)
  init = _BeamState(
    t=jnp.array(0, jnp.int32),
    alive_token_BK=start_BK,
    alive_state=state,
    alive_tokens_BKT=no_tokens_BKT,
    alive_attention_BKTL=no_attention_BKTL,
    alive_log_prob_BK=jnp.where(first_BK, 0.0, no_scores_BK),
    finished_tokens_BKT=no_tokens_BKT,
    finished_attention_BKTL=no_attention_BKTL,
    finished_log_prob_BK=no_scores_BK,
    finished_score_BK=no_scores_BK,
  )
  s = lax.while_loop(beam_cond_fn, beam_body_fn, init)

  # Alive hypotheses have length t. If the loop stopped early they cannot
  # outrank the K finished ones, so merging them always is safe; if it ran to
  # max_len they are the cut hypotheses, ranked with the finished.
  alive_score_BK = s.alive_log_prob_BK / length_penalty(s.t, alpha)
  concat = lambda x, y: jnp.concatenate([x, y], axis=1)
  score_BK, log_prob_BK, tokens_BKT, attention_BKTL = _top_k(
    concat(s.finished_score_BK, alive_score_BK),
    k,
    concat(s.finished_log_prob_BK, s.alive_log_prob_BK),
    concat(s.finished_tokens_BKT, s.alive_tokens_BKT),
    concat(s.finished_attention_BKTL, s.alive_attention_BKTL),
  )
  return Beams(
    tokens_BKT=tokens_BKT,
    lengths_BK=jnp.sum(tokens_BKT != _PAD, axis=-1, dtype=jnp.int32),
    attention_BKTL=attention_BKTL,
    log_prob_BK=log_prob_BK,
    score_BK=score_BK,
  )
