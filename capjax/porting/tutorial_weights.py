"""The tutorial model's weights as capjax parameters.

The tutorial's model is a `CNN_Encoder` (`fc`) and an `RNN_Decoder`
(`embedding`, `gru`, `fc1`, `fc2`, `attention` with `W1`, `W2`, `V`). Its
weights come here as a flat mapping from '/'-joined names to arrays, in Keras'
layouts:

  encoder/fc/{kernel,bias}
  decoder/embedding/embeddings                     (V, E)
  decoder/gru/kernel                               (2E, 3U), [context; token]
  decoder/gru/recurrent_kernel                     (U, 3U)
  decoder/gru/bias                                 (2, 3U), reset_after=True
  decoder/fc1/{kernel,bias}, decoder/fc2/{kernel,bias}
  decoder/attention/{W1,W2,V}/{kernel,bias}

Keras orders GRU gate columns (z, r, h), as capjax does, and concatenates the
context before the token embedding, so the kernel's first E rows act on the
context. This module is numpy only.
"""

from collections.abc import Mapping

import numpy as np

from capjax import errors

_DENSE_LAYERS = {
  # capjax path: tutorial name
  ('encoder', 'fc'): 'encoder/fc',
  ('attention', 'W1'): 'decoder/attention/W1',
  ('attention', 'W2'): 'decoder/attention/W2',
  ('attention', 'V'): 'decoder/attention/V',
  ('fc1',): 'decoder/fc1',
  ('fc2',): 'decoder/fc2',
}

TUTORIAL_WEIGHT_NAMES = tuple(
  sorted(
    [
      f'{name}/{part}'
      for name in _DENSE_LAYERS.values()
      for part in ('kernel', 'bias')
    ]
    + [
      'decoder/embedding/embeddings',
      'decoder/gru/kernel',
      'decoder/gru/recurrent_kernel',
      'decoder/gru/bias',
    ]
  )
)


def _nest(path: tuple[str, ...], value, tree: dict) -> None:
  for key in path[:-1]:
    tree = tree.setdefault(key, {})
  tree[path[-1]] = value


def params_from_tutorial(weights: Mapping[str, np.ndarray]) -> dict:
  """capjax `params` from the tutorial model's weights (see module docstring).

  Raises:
    UserError: naming every missing weight, or on a GRU that is not
      reset_after=True or whose input is not [context; token].
  """
  missing = [name for name in TUTORIAL_WEIGHT_NAMES if name not in weights]
  if missing:
    raise errors.UserError(
      'not the tutorial model: missing weights ' + ', '.join(missing)
    )
  w = {
    name: np.asarray(weights[name], np.float32)
    for name in TUTORIAL_WEIGHT_NAMES
  }
  params: dict = {}
  for path, name in _DENSE_LAYERS.items():
    _nest(path + ('kernel',), w[f'{name}/kernel'], params)
    # V's bias shifts every attention score alike, which softmax undoes:
    # capjax has no such parameter.
    if name != 'decoder/attention/V':
      _nest(path + ('bias',), w[f'{name}/bias'], params)
  embeddings = w['decoder/embedding/embeddings']
  _nest(('embedding', 'embedding'), embeddings, params)

  kernel = w['decoder/gru/kernel']
  bias = w['decoder/gru/bias']
  embedding_dim = embeddings.shape[1]
  if bias.shape[0] != 2:
    raise errors.UserError(
      f'decoder/gru/bias has shape {bias.shape}; expected '
      '(2, 3U) from a GRU with reset_after=True'
    )
  if kernel.shape[0] != 2 * embedding_dim:
    raise errors.UserError(
      f'decoder/gru/kernel has {kernel.shape[0]} input rows; '
      f'expected context + embedding = {2 * embedding_dim}'
    )
  _nest(
    ('gru',),
    {
      'context_kernel': kernel[:embedding_dim],
      'token_kernel': kernel[embedding_dim:],
      'input_bias': bias[0],
      'recurrent_kernel': w['decoder/gru/recurrent_kernel'],
      'recurrent_bias': bias[1],
    },
    params,
  )
  return params


def select_tokens(params: dict, tutorial_ids: np.ndarray) -> dict:
  """`params` whose token axes hold the given tutorial ids, in that order.

  The token axes are the embedding's rows and fc2's columns: capjax id k
  gets the row and column of tutorial id `tutorial_ids[k]`.
  """
  embedding, fc2 = params['embedding']['embedding'], params['fc2']
  return {
    **params,
    'embedding': {'embedding': embedding[tutorial_ids]},
    'fc2': {
      'kernel': fc2['kernel'][:, tutorial_ids],
      'bias': fc2['bias'][tutorial_ids],
    },
  }
