"""Continuous batching: greedy decoding of rows that join and leave each step.

A whole-batch decoder runs every caption of a batch until the longest one
ends, and a request that arrives meanwhile waits for all of it. Here the
decoder holds up to `capacity` rows and advances them one token per `step`;
a finished row is handed back at once and its slot taken by the next waiting
image (`admit`), so the decoder does useful work for every row of every
step. Each row has its own `max_len`, as data, not as a compiled shape.

The step is the Captioner's own `decode_step` (`decoding.model_step_fn`) and
chooses as `search.greedy_search` does, so a row's tokens, attention and
log-probability are those of `decoding.caption_features` with beam_size 1.

Compiled shapes are fixed: the steps for every capacity of `sizes`, the
encoder for every admission size, the insertion of new rows for both.
Growing or shrinking the capacity moves the rows through host memory
(numpy), which compiles nothing, so after `warm_up` no request can cause a
compilation.
"""

from collections.abc import Callable, Sequence
import dataclasses
import functools
import time
from typing import Any, cast

import flax
import jax
import jax.numpy as jnp
import numpy as np

from capjax import tokens
from capjax.model import captioner
from capjax.model import decoding
from capjax.model import recurrence
from capjax.model import search

Array = jax.Array

_PAD = tokens.PAD_ID
_START = tokens.START_ID
_END = tokens.END_ID
_CALLS_BEFORE_SHRINKING = 64


@flax.struct.dataclass
class _Rows:
  """The decoding state of n rows (free slots are done).

  On the device (jax.Array), or in host memory (np.ndarray) while it is
  made or resized.
  """

  h_nU: Array | np.ndarray
  token_n: Array | np.ndarray  # the last token, fed to the next step
  t_n: Array | np.ndarray  # tokens generated so far
  max_len_n: Array | np.ndarray
  done_n: Array | np.ndarray
  tokens_nT: Array | np.ndarray
  attention_nTL: Array | np.ndarray
  log_prob_n: Array | np.ndarray


@functools.partial(jax.jit, static_argnames=('model',))
def _encode(
  params: Any, features_mLD: Array, *, model: captioner.Captioner
) -> recurrence.Encoded:
  # Without `mutable`, apply returns the method's output alone; flax's
  # annotation also allows (output, variables).
  return cast(
    recurrence.Encoded,
    model.apply(
      {'params': params}, features_mLD, method=captioner.Captioner.encode
    ),
  )


@functools.partial(jax.jit, donate_argnums=(0, 1))
def _insert(
  rows: _Rows,
  encoded: recurrence.Encoded,
  new_encoded: recurrence.Encoded,
  slots_m: Array,
  max_len_m: Array,
) -> tuple[_Rows, recurrence.Encoded]:
  """New rows at slots_m; out-of-range slots pad the admission: dropped."""
  put = lambda a, b: a.at[slots_m].set(b, mode='drop')
  zeros = lambda a: put(a, jnp.zeros((len(slots_m),) + a.shape[1:], a.dtype))
  rows = _Rows(
    h_nU=zeros(rows.h_nU),
    token_n=put(rows.token_n, jnp.full_like(slots_m, _START)),
    t_n=zeros(rows.t_n),
    max_len_n=put(rows.max_len_n, max_len_m),
    done_n=put(rows.done_n, jnp.zeros_like(slots_m, bool)),
    tokens_nT=zeros(rows.tokens_nT),
    attention_nTL=zeros(rows.attention_nTL),
    log_prob_n=zeros(rows.log_prob_n),
  )
  return rows, jax.tree_util.tree_map(put, encoded, new_encoded)


def _step(
  step_fn: search.StepFn, rows: _Rows, encoded: recurrence.Encoded
) -> _Rows:
  """One greedy step of every live row, as `search.greedy_search` takes it."""
  # Under jit (`_steps`), the rows are traced Arrays.
  logits_nV, h_nU, attention_nL = step_fn(
    rows.h_nU, cast(Array, rows.token_n), encoded
  )
  log_probs_nV = search.token_log_probs(logits_nV)
  live_n = ~rows.done_n
  token_n = jnp.where(live_n, jnp.argmax(log_probs_nV, axis=-1), _PAD)
  token_log_prob_n = jnp.take_along_axis(
    log_probs_nV, token_n[:, None], axis=-1
  )[:, 0]
  t_n = rows.t_n + live_n
  # Each live row writes at its own position t (a mask, not a scatter:
  # XLA's CPU scatter costs more than the step's matmuls).
  write_nT = live_n[:, None] & (
    jnp.arange(rows.tokens_nT.shape[1]) == rows.t_n[:, None]
  )
  return _Rows(
    h_nU=h_nU,
    token_n=token_n,
    t_n=t_n,
    max_len_n=rows.max_len_n,
    done_n=rows.done_n | (token_n == _END) | (t_n >= rows.max_len_n),
    tokens_nT=jnp.where(write_nT, token_n[:, None], rows.tokens_nT),
    attention_nTL=jnp.where(
      write_nT[:, :, None],
      attention_nL[:, None].astype(jnp.float32),
      rows.attention_nTL,
    ),
    log_prob_n=rows.log_prob_n + jnp.where(live_n, token_log_prob_n, 0.0),
  )


@functools.partial(jax.jit, static_argnames=('model',), donate_argnums=(1,))
def _steps(
  params: Any,
  rows: _Rows,
  encoded: recurrence.Encoded,
  k: Array,
  until_one_ends: Array,
  *,
  model: captioner.Captioner,
) -> tuple[_Rows, Array]:
  """Up to k steps, and how many were taken.

  The steps end early once every row has ended, or, if until_one_ends, once
  one has: its request is answered at once, and its slot can take the next
  image.
  """
  step_fn = decoding.model_step_fn(model, params)

  def cond_fn(carry):
    i, rows, ended = carry
    return (i < k) & ~(until_one_ends & ended) & ~jnp.all(rows.done_n)

  def body_fn(carry):
    i, rows, _ = carry
    stepped = _step(step_fn, rows, encoded)
    return i + 1, stepped, jnp.any(stepped.done_n & ~rows.done_n)

  i, rows, _ = jax.lax.while_loop(
    cond_fn, body_fn, (jnp.int32(0), rows, jnp.bool_(False))
  )
  return rows, i


@dataclasses.dataclass(frozen=True)
class Finished:
  """A finished row: its generated tokens (<end> included if it came)."""

  token_ids: list[int]
  attention_TL: np.ndarray
  log_prob: float


class GreedyRows:
  """Greedy decoding of up to `sizes[-1]` rows, admitted and finished per step.

  Not thread-safe: one thread (the batch worker) calls it.
  """

  def __init__(
    self,
    model: captioner.Captioner,
    params: Any,
    shape_LD: tuple[int, int],
    max_len: int,
    sizes: Sequence[int],
    step_s: float = 0.01,
  ):
    """Makes an empty decoder.

    Args:
      model: the Captioner.
      params: its parameters.
      shape_LD: the feature grid's (L, D).
      max_len: the largest max_len of a row (the token buffers' length).
      sizes: the capacities and admission sizes, ascending; powers of two
        and the largest.
      step_s: about how long one `step` call runs, at most (it takes at
        least one step): how long a new row may wait to join.
    """
    self.step_s = step_s
    self._params = params
    self._shape_LD = tuple(shape_LD)
    self._max_len = max_len
    self.sizes = tuple(sizes)
    self._model = model
    self._encoded_shape = jax.eval_shape(
      functools.partial(_encode, model=model),
      params,
      jax.ShapeDtypeStruct((1,) + self._shape_LD, jnp.float32),
    )
    # Committed to a device, as the jitted functions' outputs are: jit
    # compiles again for arguments that differ only in that.
    self._device = jax.local_devices()[0]
    self._rows, self._encoded = self._put(self._empty(self.sizes[0]))
    # slot -> the caller's key of the row decoded there.
    self._keys: dict[int, Any] = {}
    # Seconds per step by capacity, measured.
    self._step_time_s: dict[int, float] = {}
    self._calls_mostly_empty = 0
    self._alone = False

  @property
  def capacity(self) -> int:
    return int(self._rows.done_n.shape[0])

  @property
  def active(self) -> int:
    return len(self._keys)

  @property
  def room(self) -> int:
    """How many rows can be admitted now."""
    return self.sizes[-1] - self.active

  def _empty(self, n: int) -> tuple[_Rows, Any]:
    """The state of n free slots, in host memory."""
    length, (num_positions, _) = self._max_len, self._shape_LD
    encoded = jax.tree_util.tree_map(
      lambda s: np.zeros((n,) + s.shape[1:], s.dtype), self._encoded_shape
    )
    rows = _Rows(
      h_nU=np.zeros((n, encoded.keys_BLU.shape[-1]), np.float32),
      token_n=np.zeros(n, np.int32),
      t_n=np.zeros(n, np.int32),
      max_len_n=np.zeros(n, np.int32),
      done_n=np.ones(n, bool),
      tokens_nT=np.zeros((n, length), np.int32),
      attention_nTL=np.zeros((n, length, num_positions), np.float32),
      log_prob_n=np.zeros(n, np.float32),
    )
    return rows, encoded

  def _put(self, tree: Any) -> Any:
    return jax.device_put(tree, self._device)

  def _resize(self, n: int) -> None:
    """Moves the active rows into n slots (through the host: no compile)."""
    if n == self.capacity:
      return
    new_rows, new_encoded = self._empty(n)
    old_slots = sorted(self._keys)
    if old_slots:
      rows, encoded = jax.device_get((self._rows, self._encoded))
      index = np.arange(len(old_slots))

      def move(new, old):
        new[index] = old[old_slots]
        return new

      new_rows = jax.tree_util.tree_map(move, new_rows, rows)
      new_encoded = jax.tree_util.tree_map(move, new_encoded, encoded)
      self._keys = {int(i): self._keys[s] for i, s in zip(index, old_slots)}
    self._rows, self._encoded = self._put((new_rows, new_encoded))
    self._calls_mostly_empty = 0

  def _fit(self, n: int) -> int:
    return min(s for s in self.sizes if s >= n)

  def admit(
    self, keys: Sequence[Any], features_mLD: np.ndarray, max_lens: Sequence[int]
  ) -> None:
    """Starts decoding rows; at most `room` of them.

    Args:
      keys: the caller's key of each row, returned by `step` when it ends.
      features_mLD: their feature grids.
      max_lens: the most tokens of each, 1 to max_len.
    """
    m = len(keys)
    if not 0 < m <= self.room:
      raise ValueError(f'cannot admit {m} rows, room for {self.room}')
    needed = self.active + m
    # A row admitted alone to an empty decoder runs to its end in one call
    # (see `step`): a request alone pays no more dispatches and waits than
    # a whole batch of one. Rows admitted together share steps as usual.
    self._alone = not self._keys and m == 1
    if needed > self.capacity or not self._keys:
      # An empty decoder starts again at the size the rows need.
      self._resize(self._fit(needed))
    free = [s for s in range(self.capacity) if s not in self._keys][:m]
    size = self._fit(m)
    # Padded with copies of a real grid, to a compiled admission size.
    features = np.concatenate(
      [features_mLD, np.repeat(features_mLD[:1], size - m, axis=0)]
    )
    slots = np.array(free + [self.capacity] * (size - m), np.int32)
    lens = np.array(list(max_lens) + [1] * (size - m), np.int32)
    self._rows, self._encoded = _insert(
      self._rows,
      self._encoded,
      _encode(self._params, features, model=self._model),
      slots,
      lens,
    )
    self._keys.update(zip(free, keys))

  def step(self) -> list[tuple[Any, Finished]]:
    """Advances the active rows for about `step_s`, or (full) until one ends.

    A row admitted alone to an idle decoder runs to its end in this call.

    Returns:
      (key, Finished) of the rows that ended.
    """
    if not self._keys:
      return []
    n = self.capacity
    if self._alone:
      # The decoder was idle: the row runs to its end at once, as a whole
      # batch of one would; rows arriving meanwhile are admitted after it.
      k, until_one_ends = self._max_len, False
      self._alone = False
    elif not self.room:
      # No row can join before one ends: run until one does.
      k, until_one_ends = self._max_len, True
    else:
      # As many steps as fit in step_s at the last calls' pace: new rows
      # join within about step_s, and a cheap step's call (dispatch, and the
      # wait for Python's lock between calls) costs less than the steps.
      k = max(1, int(self.step_s / self._step_time_s.get(n, 1.0)))
      until_one_ends = False
    start = time.perf_counter()
    self._rows, steps = _steps(
      self._params,
      self._rows,
      self._encoded,
      k,
      until_one_ends,
      model=self._model,
    )
    outputs = (
      self._rows.t_n,
      self._rows.tokens_nT,
      self._rows.attention_nTL,
      self._rows.log_prob_n,
    )
    # One transfer: rows run to their end need all of it at once.
    done_n, steps, *fetched = jax.device_get(
      (self._rows.done_n, steps) + (outputs if k == self._max_len else ())
    )
    steps = int(steps)
    if steps:
      elapsed = (time.perf_counter() - start) / steps
      self._step_time_s[n] = 0.8 * self._step_time_s.get(n, elapsed) + (
        0.2 * elapsed
      )
    ended = [s for s in self._keys if done_n[s]]
    finished = []
    if ended:
      t_n, tokens_nT, attention_nTL, log_prob_n = fetched or jax.device_get(
        outputs
      )
      for s in ended:
        length = int(t_n[s])
        finished.append(
          (
            self._keys.pop(s),
            Finished(
              token_ids=tokens_nT[s, :length].tolist(),
              attention_TL=np.array(attention_nTL[s, :length]),
              log_prob=float(log_prob_n[s]),
            ),
          )
        )
    # Shrinks once a quarter of the slots or less have been used for a while:
    # moving the rows costs more than a step, and the load comes back.
    if self.active * 4 <= self.capacity and self.capacity > self.sizes[0]:
      self._calls_mostly_empty += 1
      if self._calls_mostly_empty >= _CALLS_BEFORE_SHRINKING:
        self._resize(self._fit(max(self.active, 1)))
    else:
      self._calls_mostly_empty = 0
    return finished

  def abandon(self) -> list[Any]:
    """Drops every row; returns their keys."""
    keys = list(self._keys.values())
    self._rows, self._encoded = self._put(self._empty(self.sizes[0]))
    self._keys = {}
    return keys

  def warm_up(self, stop: Callable[[], bool] = lambda: False) -> None:
    """Compiles every capacity and admission size; leaves the decoder empty.

    Args:
      stop: checked before each compilation; True ends the warm-up early.
    """
    for n in self.sizes:
      rows, encoded = self._put(self._empty(n))
      for m in (s for s in self.sizes if s <= n):
        if stop():
          return
        features = np.zeros((m,) + self._shape_LD, np.float32)
        rows, encoded = _insert(
          rows,
          encoded,
          _encode(self._params, features, model=self._model),
          np.arange(m, dtype=np.int32),
          np.ones(m, np.int32),
        )
      rows, _ = _steps(self._params, rows, encoded, 1, False, model=self._model)
      jax.block_until_ready(rows)
