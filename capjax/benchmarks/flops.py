"""Model FLOPs of a train step, counted from the matmuls.

2*m*n*k per matmul or einsum of the forward pass over the T-1 predicted
steps, x3 for forward + gradient of the inputs + gradient of the weights
(each as costly as the forward), x2 where the inputs need no gradient:

  encoder      B*L     x D  x E       (x2: no gradient for the features)
  W1 keys      B*L     x E  x U       (x3)
  token input  B*(T-1) x E  x 3U      (x3)
  per step, times T-1:
    W2 query   B       x U  x U       (x3)
    V score    B*L     x U  x 1       (x3)
    context    B       x L  x E       (x3)
    GRU input  B       x E  x 3U      (x3, context half)
    GRU state  B       x U  x 3U      (x3)
  fc1          B*(T-1) x U  x U       (x3)
  fc2          B*(T-1) x U  x V       (x3)

Elementwise work (tanh, softmax, the loss, Adam) and recomputation are not
counted. The tutorial applies W1 on the features at every step after the
first; the ratio of its count to capjax's is the training speed-up that equal
FLOP/s would give.
"""

from capjax.benchmarks import workload


def train_flops(length: int) -> float:
  """Model FLOPs of one train step on captions of `length` tokens."""
  b, l, d, e, u, v = (
    workload.BATCH_SIZE,
    workload.NUM_LOCATIONS,
    workload.FEATURE_DIM,
    workload.EMBEDDING_DIM,
    workload.UNITS,
    workload.VOCAB_SIZE,
  )
  steps = length - 1
  per_step = b * u * u + b * l * u + b * l * e + b * e * 3 * u + b * u * 3 * u
  forward_with_input_grads = (
    b * l * e * u
    + b * steps * e * 3 * u
    + steps * per_step
    + b * steps * u * u
    + b * steps * u * v
  )
  return 2 * (2 * b * l * d * e + 3 * forward_with_input_grads)


def tutorial_train_flops(length: int) -> float:
  """The same count for the tutorial, which applies W1 at every step."""
  b, l, e, u = (
    workload.BATCH_SIZE,
    workload.NUM_LOCATIONS,
    workload.EMBEDDING_DIM,
    workload.UNITS,
  )
  return train_flops(length) + 2 * 3 * (length - 2) * b * l * e * u
